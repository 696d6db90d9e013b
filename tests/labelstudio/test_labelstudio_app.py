"""The exported tasks in the real Label Studio: projects, imports, predictions, images.

For both formats, through Label Studio's REST API: a project with our labelling
config, a storage that serves the images, the tasks imported; then every ok still
image is a task, every exported detection is one prediction region (a polygon's
further parts are its children) with its label and score, brush masks read back are
the Parquet masks pixel for pixel, and each task's image URL, opened through Label
Studio, gives the image's bytes. Images on S3 (moto) load through a cloud storage
connection of the project.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sam3ray.analytics.labelstudio import brush_rle_to_mask
from sam3ray.cli import main
from tests.support.labelstudio import create_project, project_tasks
from tests.unit.analytics.test_scan import NAMES, build_output


@pytest.fixture(scope="module")
def local_output(label_studio):
    """The synthetic output, its images under Label Studio's document root."""
    root = label_studio.document_root
    return build_output(str(root.parent / "out"), {}, str(root / "dataset" / "images"))


def _export(output: str, tmp: Path, fmt: str, *extra: str) -> tuple[list[dict], str]:
    tasks, config = tmp / f"tasks-{fmt}.json", tmp / f"config-{fmt}.xml"
    code = main(["export", "labelstudio", output, "--out", str(tasks), "--format", fmt,
                 "--labeling-config", str(config), *extra])  # fmt: skip
    assert code == 0
    return json.loads(tasks.read_text(encoding="utf-8")), config.read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", ["rle", "polygon"])
def test_tasks_predictions_and_images_in_label_studio(label_studio, local_output, tmp_path, fmt):
    ls, syn = label_studio, local_output
    exported, config = _export(syn.output, tmp_path, fmt, "--local-files-root",
                               str(ls.document_root))  # fmt: skip
    images_dir = str(Path(syn.ok_images[next(iter(syn.ok_images))]).parent)
    storage = ("localfiles", {"path": images_dir, "use_blob_urls": False, "title": "images"})
    project = create_project(ls, f"sam3ray {fmt}", config, exported, storage)
    tasks = project_tasks(ls, project)

    # every ok still image is one task; the error row and the video are not
    assert sorted(t["data"]["sam3ray_image_id"] for t in tasks) == sorted(syn.ok_images)
    still = [d for d in syn.detections if d["frame_index"] is None]
    regions = objects = 0
    for task in tasks:
        image_id = task["data"]["sam3ray_image_id"]
        truth = [d for d in still if d["image_id"] == image_id]
        assert len(task["predictions"]) == (1 if truth else 0)
        results = [r for p in task["predictions"] for r in p["result"]]
        regions += len(results)
        tops = [r for r in results if not r.get("parentID")]
        ids = {r["id"] for r in tops}
        assert all(r["parentID"] in ids for r in results if r.get("parentID"))
        objects += len(tops)
        label_key = "brushlabels" if fmt == "rle" else "polygonlabels"
        got = Counter((r["value"][label_key][0], round(r["score"], 6)) for r in tops)
        want = Counter((NAMES[d["class_id"]], round(d["score"], 6)) for d in truth)
        assert got == want, image_id  # one region per detection, its label and score
        if fmt == "rle":
            by_key = {(NAMES[d["class_id"]], round(d["score"], 6)): d for d in truth}
            for r in tops:
                h, w = r["original_height"], r["original_width"]
                det = by_key[(r["value"]["brushlabels"][0], round(r["score"], 6))]
                assert np.array_equal(brush_rle_to_mask(r["value"]["rle"], h, w), det["mask"])
        # the image, opened through Label Studio as the labelling page opens it
        image = ls.session.get(ls.url + task["data"]["image"], timeout=60)
        assert image.status_code == 200, task["data"]["image"]
        assert image.content == Path(syn.ok_images[image_id]).read_bytes()
    assert objects == len(still)  # the Parquet rows, each once
    print(f"\n[{fmt}] tasks {len(tasks)}, predictions "
          f"{sum(len(t['predictions']) for t in tasks)}, regions {regions}, detections "
          f"(Parquet rows, still images) {len(still)}")  # fmt: skip


@pytest.mark.parametrize("presign", [True, False])
def test_s3_images_through_a_cloud_storage(label_studio, moto_s3, tmp_path, presign):
    """s3:// URLs as exported; the project's S3 storage (moto) resolves them."""
    ls = label_studio
    bucket = moto_s3.new_bucket("ls-images")
    opts = moto_s3.storage_options
    syn = build_output(f"s3://{bucket}/out", opts, f"s3://{bucket}/images")
    flags = [f"--storage-option=key={opts['key']}", f"--storage-option=secret={opts['secret']}",
             f"--storage-option=client_kwargs.endpoint_url={moto_s3.endpoint_url}",
             "--storage-option=client_kwargs.region_name=us-east-1"]  # fmt: skip
    exported, config = _export(syn.output, tmp_path, "polygon", *flags)
    assert all(t["data"]["image"].startswith(f"s3://{bucket}/images/") for t in exported)
    storage = ("s3", {"bucket": bucket, "prefix": "images", "title": "images",
                      "aws_access_key_id": opts["key"], "aws_secret_access_key": opts["secret"],
                      "region_name": "us-east-1", "s3_endpoint": moto_s3.endpoint_url,
                      "presign": presign, "use_blob_urls": True})  # fmt: skip
    project = create_project(ls, f"sam3ray s3 presign={presign}", config, exported, storage)
    tasks = project_tasks(ls, project)
    assert len(tasks) == len(syn.ok_images)
    s3 = moto_s3.boto3_client()
    for task in tasks:
        resolved = ls.api("GET", f"/api/tasks/{task['id']}")["data"]["image"]
        assert not resolved.startswith("s3://"), resolved  # the storage resolved it
        url = resolved if resolved.startswith("http") else ls.url + resolved
        image = ls.session.get(url, timeout=60)  # a presigned redirect is followed to moto
        assert image.status_code == 200, resolved
        key = syn.ok_images[task["data"]["sam3ray_image_id"]].split("/", 3)[3]
        assert image.content == s3.get_object(Bucket=bucket, Key=key)["Body"].read()
