"""A small but complete synthetic output for the analytics tests (and a check of it).

``build_output`` writes real PNG images and a job output through the real
writer (``ShardWriter``), local or on S3: two runs, three concepts with
detections (filled circles, squares, rings with holes) and one without, an
ok image without detections, an error row, and a video input with detections
on three frames. It returns the detections as the test's ground truth.
The other analytics tests import it from here (``from test_scan import ...``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sam3ray.core.ids import input_id
from sam3ray.core.masks import decode_rle, encode_rle
from sam3ray.output.schema import detections_table, images_table
from sam3ray.output.writer import ShardOutput, ShardWriter, write_run_summary
from sam3ray.storage.location import Location
from tests.support.images import encode, scene

CIRCLE = "11111111-1111-4111-8111-111111111111"
SQUARE = "22222222-2222-4222-8222-222222222222"
RING = "33333333-3333-4333-8333-333333333333"
UNUSED = "04444444-4444-4444-8444-444444444444"  # sorts first: category id 1
NAMES = {CIRCLE: "circle", SQUARE: "square", RING: "ring", UNUSED: "unused"}
MODEL = "sam3-test.pt@0123456789ab"


@dataclass
class Synthetic:
    output: str
    storage_options: dict[str, Any]
    detections: list[dict[str, Any]] = field(default_factory=list)  # with "mask" (bool array)
    ok_images: dict[str, str] = field(default_factory=dict)  # image_id -> uri (still images)
    error_uri: str = ""
    video_id: str = ""

    @property
    def loc(self) -> Location:
        """The output as the analytics functions take it."""
        return Location(self.output, self.storage_options)

    def at(self, uri: str) -> Location:
        """Another URI with the output's storage options (export targets, results)."""
        return Location(uri, self.storage_options)

    def masks(self, class_id: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.detections if class_id in (None, d["class_id"])]


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    if kind == "circle":
        return d2 <= r * r
    if kind == "ring":
        return (d2 <= r * r) & (d2 > (r * 0.5) ** 2)
    return (abs(xx - cx) <= r) & (abs(yy - cy) <= r)


def _det(run_id: str, uri: str, class_id: str, score: float, mask: np.ndarray, **extra) -> dict:
    counts, area = encode_rle(mask)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return {
        "run_id": run_id, "image_id": input_id(uri), "uri": uri, "class_id": class_id,
        "concept": NAMES[class_id], "query": f'text:"{NAMES[class_id]}"', "score": score,
        "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
        "mask_rle": counts, "mask_size": [h, w], "area": area, "width": w, "height": h,
        "model": MODEL, "frame_index": extra.get("frame_index"),
        "track_id": extra.get("track_id"),
    }  # fmt: skip


def _img(run_id: str, shard: str, uri: str, status: str, **extra) -> dict:
    return {"run_id": run_id, "image_id": input_id(uri), "uri": uri, "shard_id": shard,
            "status": status, "n_detections": extra.pop("n", 0), **extra}  # fmt: skip


def build_output(output: str, storage_options: dict[str, Any], images_prefix: str) -> Synthetic:
    """Write images under ``images_prefix`` and a two-run output at ``output``."""
    rng = np.random.default_rng(7)
    syn = Synthetic(output, dict(storage_options))
    images = Location(images_prefix, storage_options)
    concepts = "class_id,name,text\n" + "".join(f"{c},{n},{n}\n" for c, n in NAMES.items())
    images.child("concepts.csv").write_bytes(concepts.encode())
    concepts_uri = images.child("concepts.csv").uri
    writer = ShardWriter(syn.loc)
    plan = [("20260101T000000Z-aaaaaa", "s0001", range(0, 4)),
            ("20260102T000000Z-bbbbbb", "s0002", range(4, 7))]  # fmt: skip
    for run_id, shard, indices in plan:
        dets, imgs = [], []
        for i in indices:
            h, w = (120, 160) if i % 2 else (150, 200)
            im = Image.fromarray(scene(i, (h, w)))
            draw = ImageDraw.Draw(im)
            uri = f"{images_prefix}/img-{i:02d}.png"
            mine = []
            for k, (kind, cid) in enumerate([("circle", CIRCLE), ("square", SQUARE),
                                              ("ring", RING)] if i != 3 else []):  # fmt: skip
                for j in range(1 + (i + k) % 3):
                    r = float(rng.uniform(10, 28))
                    cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
                    mask = _shape_mask(kind, h, w, cx, cy, r)
                    score = round(float(rng.uniform(0.3, 0.99)), 4) + j * 1e-6
                    mine.append(_det(run_id, uri, cid, score, mask))
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 255, 255))
            images.child(f"img-{i:02d}.png").write_bytes(encode(im, "PNG"))
            imgs.append(_img(run_id, shard, uri, "ok", n=len(mine), width=w, height=h))
            syn.ok_images[input_id(uri)] = uri
            dets += mine
        if shard == "s0001":
            syn.error_uri = f"{images_prefix}/broken.jpg"
            imgs.append(_img(run_id, shard, syn.error_uri, "error", error="not an image",
                             error_reason="not_an_image"))  # fmt: skip
        else:
            video = f"{images_prefix}/clip.mp4"
            syn.video_id = input_id(video)
            for f in range(3):
                mask = _shape_mask("circle", 90, 120, 30 + 10 * f, 45, 15)
                dets.append(_det(run_id, video, CIRCLE, 0.9 - f / 10, mask, frame_index=f,
                                 track_id=1))  # fmt: skip
            imgs.append(_img(run_id, shard, video, "ok", n=3, width=120, height=90,
                             frame_start=0, frame_end=8))  # fmt: skip
        writer.write(ShardOutput(shard_id=shard, run_id=run_id, detections=detections_table(dets),
                                 images=images_table(imgs)))  # fmt: skip
        summary = {"run_id": run_id, "status": "succeeded", "config": {
            "prompts": {"concepts": concepts_uri}, "input": {"storage_options": {}}},
            "throughput": {"images_per_s": 2.5}}  # fmt: skip
        write_run_summary(syn.loc, run_id, summary)
        for d in dets:
            d["mask"] = decode_rle(d["mask_rle"], d["mask_size"])
        syn.detections += dets
    return syn


def test_synthetic_output_is_a_valid_output(tmp_path):
    """The builder goes through the real writer and readers: the layout the tools read."""
    from sam3ray.output.readers import detections_dataset, images_dataset

    syn = build_output(str(tmp_path / "out"), {}, str(tmp_path / "images"))
    det = detections_dataset(syn.loc).to_table()
    assert det.num_rows == len(syn.detections) > 20
    assert set(det.column("class_id").to_pylist()) == {CIRCLE, SQUARE, RING}
    img = images_dataset(syn.loc).to_table().to_pylist()
    assert sorted(r["status"] for r in img).count("error") == 1
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 2
    assert json.loads((tmp_path / "out" / "runs" / runs[0]).read_text())["status"] == "succeeded"


def test_check_output_refuses_a_folder_that_is_no_output(tmp_path):
    """A typo in the path must not read as "zero detections", nor create anything."""
    from sam3ray.analytics import check_output, connect

    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError, match="no sam3ray output"):
            check_output(Location(str(where)))
        with pytest.raises(FileNotFoundError):
            connect(Location(str(where)))
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())


def test_runs_categories_and_selection(tmp_path):
    """Runs oldest first (unreadable summaries skipped); category ids 1..N by sorted UUID,
    also for a concept without detections; selection by name or UUID keeps the ids."""
    from sam3ray.analytics import categories, read_runs, select_categories

    syn = build_output(str(tmp_path / "out"), {}, str(tmp_path / "images"))
    (tmp_path / "out" / "runs" / "20260103T000000Z-broken.json").write_text("{not json")
    runs = read_runs(syn.loc)
    assert [r["run_id"] for r in runs] == ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"]
    cats = categories(syn.loc, runs)
    assert [(c.id, c.class_id, c.name) for c in cats] == [
        (1, UNUSED, "unused"),
        (2, CIRCLE, "circle"),
        (3, SQUARE, "square"),
        (4, RING, "ring"),
    ]
    chosen = select_categories(cats, ["RING", CIRCLE, "circle"])
    assert [(c.id, c.name) for c in chosen] == [(2, "circle"), (4, "ring")]
    assert select_categories(cats, None) == cats
    with pytest.raises(ValueError, match=r"unknown concept\(s\) \['dog'\]; known: unused"):
        select_categories(cats, ["dog"])

    # without the concept table (moved away), names come from the detections' own
    # ``concept`` column, and a concept that found nothing is not known at all
    (tmp_path / "images" / "concepts.csv").unlink()
    assert [(c.id, c.class_id, c.name) for c in categories(syn.loc)] == [
        (1, CIRCLE, "circle"),
        (2, SQUARE, "square"),
        (3, RING, "ring"),
    ]


def test_open_output_names_only_its_own_refusals(moto_s3):
    """A PermissionError raised by the caller's body (reading the lake, presigning) is
    not the destination's: it propagates unchanged, not as "cannot write <dest>"; the
    store's own refusal of the file still names the file."""
    from sam3ray.analytics import open_output
    from tests.support.readonly_s3 import ReadOnlyS3Proxy

    exports, lake = moto_s3.new_bucket("open-output"), moto_s3.new_bucket("open-output-ro")
    dest = Location(f"s3://{exports}/export.json", moto_s3.storage_options)
    body = PermissionError("AccessDenied reading s3://lake/detections")
    with pytest.raises(PermissionError) as caught, open_output(dest) as f:
        f.write("[")
        raise body
    assert caught.value is body and "cannot write" not in str(caught.value)

    with ReadOnlyS3Proxy(moto_s3.endpoint_url, bucket=lake) as proxy:
        refused = Location(f"s3://{lake}/export.json", proxy.storage_options())
        named = pytest.raises(PermissionError, match=f"cannot write s3://{lake}/export.json")
        with named, open_output(refused) as f:
            f.write("[]\n")
        assert sum(proxy.refused.values()) > 0
