"""Label Studio export: the brush RLE codec against the converter's algorithm, and the tasks."""

from __future__ import annotations

import hashlib
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_scan import CIRCLE, MODEL, NAMES, RING, build_output

from sam3ray.analytics.labelstudio import (
    brush_rle_to_mask,
    decode_values,
    encode_brush_rle,
    encode_values,
    export_labelstudio,
    labeling_config,
)
from sam3ray.storage.location import Location

# Outputs of label_studio_converter 0.0.59 ``brush.mask2rle`` / ``brush.encode_rle``, recorded
# once from the real package (it is not a dependency): the encoder must be byte-identical.
GOLDEN_SMALL = "000000fc391bfe2b00c27ff7c0309ffdf00c27ff8ac023ffc7e011ff80"
GOLDEN_BIG_SHA256 = "26c964b2472ed8125a2c4c0d2955108c200023341c6e57090ef2afd8a791c04e"
GOLDEN_VALUES = "00011192391bfc20a003d90103230981fffff09e22de12"


def reference_encode(arr: np.ndarray) -> list[int]:
    """``label_studio_converter.brush.encode_rle`` (Apache-2.0), condensed but same logic:
    the oracle for the vectorised encoder."""
    ends = np.append(np.where(arr[1:] != arr[:-1]), len(arr) - 1)
    lengths = np.diff(np.append(-1, ends))
    out = f"{len(arr):032b}" + f"{7:05b}" + "".join(f"{x - 1:04b}" for x in (3, 4, 8, 16))
    for n, value in zip(lengths, arr[ends]):
        if n == 1:
            out += "0" + "00" + "000" + f"{value:08b}"
        elif n <= 8:
            out += "1" + "00" + f"{n - 1:03b}" + f"{value:08b}"
        elif n <= 16:
            out += "1" + "01" + f"{n - 1:04b}" + f"{value:08b}"
        elif n <= 256:
            out += "1" + "10" + f"{n - 1:08b}" + f"{value:08b}"
        else:
            while n > 2**16:
                out += "1" + "11" + f"{2**16 - 1:016b}" + f"{value:08b}"
                n -= 2**16
            out += "1" + "11" + f"{n - 1:016b}" + f"{value:08b}"
    out += "0" * (8 - len(out) % 8)
    return [int(out[i : i + 8], 2) for i in range(0, len(out), 8)]


def test_encoder_matches_the_recorded_converter_output():
    small = np.zeros((7, 9), bool)
    small[1:4, 2:7] = True
    small[5, 0] = small[6, 8] = True
    assert bytes(encode_brush_rle(small)).hex() == GOLDEN_SMALL
    big = np.zeros((400, 400), bool)  # runs longer than 65536 values: split pieces
    big[200:330, 50:390] = True
    big[399, 399] = True
    assert hashlib.sha256(bytes(encode_brush_rle(big))).hexdigest() == GOLDEN_BIG_SHA256
    values = np.array([5, 5, 7] + [1] * 10 + [200] + [3] * 20 + [9] * 70000, np.uint8)
    assert bytes(encode_values(values)).hex() == GOLDEN_VALUES


def test_encoder_matches_reference_algorithm_on_random_data():
    rng = np.random.default_rng(3)
    for trial in range(120):
        n = int(rng.integers(1, 2000))
        if trial % 3 == 0:
            values = rng.integers(0, 3, n).astype(np.uint8)
        elif trial % 3 == 1:
            k = max(1, n // 40)
            values = np.repeat(rng.integers(0, 256, k).astype(np.uint8), rng.integers(1, 400, k))
        else:
            values = np.repeat(np.array([0, 255, 0], np.uint8), rng.integers(1, 150_000, 3))
        rle = encode_values(values)
        assert rle == reference_encode(values)
        assert np.array_equal(decode_values(rle), values)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        mask = rng.random((h, w)) < rng.random()
        rle = encode_brush_rle(mask)
        assert rle == reference_encode(np.repeat(mask.ravel().astype(np.uint8) * 255, 4))
        assert np.array_equal(brush_rle_to_mask(rle, h, w), mask)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("ls")
    return build_output(str(root / "out"), {}, str(root / "images"))


def _export(synthetic, tmp_path, **kwargs) -> tuple[list[dict], object]:
    out = tmp_path / "tasks.json"
    done = export_labelstudio(synthetic.loc, synthetic.at(str(out)), **kwargs)
    tasks = json.loads(out.read_text(encoding="utf-8"))
    assert done.tasks == len(tasks)
    assert done.predictions == sum(len(t["predictions"]) for t in tasks)
    assert done.results == sum(len(p["result"]) for t in tasks for p in t["predictions"])
    return tasks, done


def _tasks(synthetic, tmp_path, **kwargs) -> list[dict]:
    return _export(synthetic, tmp_path, **kwargs)[0]


def _check_task(task: dict, synthetic, type_: str) -> None:
    assert set(task) == {"data", "predictions"}
    assert isinstance(task["data"]["image"], str)
    for pred in task["predictions"]:
        assert set(pred) == {"model_version", "score", "result"} and pred["model_version"] == MODEL
        scores = [r["score"] for r in pred["result"]]
        assert pred["score"] == pytest.approx(np.mean(scores), abs=1e-6)
        assert len({r["id"] for r in pred["result"]}) == len(pred["result"])
        for r in pred["result"]:
            assert {"id", "type", "from_name", "to_name", "original_width", "original_height",
                    "image_rotation", "value", "score"} <= set(r)  # fmt: skip
            assert r["type"] == type_ and r["image_rotation"] == 0
            assert (r["from_name"], r["to_name"]) == ("label", "image")
            assert isinstance(r["id"], str) and isinstance(r["original_width"], int)
            assert r["value"][type_] and r["value"][type_][0] in NAMES.values()


def _truth(synthetic, task: dict) -> dict:
    image_id = task["data"]["sam3ray_image_id"]
    return {(NAMES[d["class_id"]], round(d["score"], 6)): d for d in synthetic.detections
            if d["image_id"] == image_id}  # fmt: skip


def test_brush_tasks_decode_to_the_parquet_masks(synthetic, tmp_path):
    tasks = _tasks(synthetic, tmp_path)
    assert {t["data"]["image"] for t in tasks} == set(synthetic.ok_images.values())  # no video
    empty = [t for t in tasks if not t["predictions"]]
    assert len(empty) == 1  # the ok image without detections is a task to label by hand
    n = 0
    for task in tasks:
        _check_task(task, synthetic, "brushlabels")
        truth = _truth(synthetic, task)
        for r in (r for p in task["predictions"] for r in p["result"]):
            det = truth[(r["value"]["brushlabels"][0], r["score"])]
            assert r["value"]["format"] == "rle"
            assert all(isinstance(v, int) and 0 <= v < 256 for v in r["value"]["rle"])
            h, w = r["original_height"], r["original_width"]
            assert np.array_equal(brush_rle_to_mask(r["value"]["rle"], h, w), det["mask"])
            n += 1
    assert n == len([d for d in synthetic.detections if d["frame_index"] is None])


def _rasterise(polygons: list[list[list[float]]], h: int, w: int, scale: int = 4) -> np.ndarray:
    im = Image.new("L", (w * scale, h * scale), 0)
    draw = ImageDraw.Draw(im)
    for points in polygons:
        draw.polygon([(x * w * scale / 100, y * h * scale / 100) for x, y in points], fill=255)
    a = np.asarray(im, dtype=np.float32).reshape(h, scale, w, scale).mean(axis=(1, 3))
    return a >= 127.5


def test_polygon_tasks_match_the_masks(synthetic, tmp_path):
    from scipy import ndimage

    tasks, done = _export(synthetic, tmp_path, fmt="polygon", concepts=["circle", "ring"],
                          min_score=0.4)  # fmt: skip
    by_det: dict[tuple, list] = {}
    for task in tasks:
        _check_task(task, synthetic, "polygonlabels")
        truth = _truth(synthetic, task)
        for r in (r for p in task["predictions"] for r in p["result"]):
            assert r["value"]["closed"] is True
            assert all(0 <= c <= 100 for pt in r["value"]["points"] for c in pt)
            assert "parentID" not in r  # circles and rings are one part each
            det = truth[(r["value"]["polygonlabels"][0], r["score"])]
            by_det.setdefault(id(det), [det]).append(r["value"]["points"])
    expected = [d for d in synthetic.detections if d["class_id"] in (CIRCLE, RING)
                and d["frame_index"] is None and d["score"] >= 0.4]  # fmt: skip
    assert len(by_det) == len(expected) == done.detections > 3
    # the loss is reported, in pixels: every ring's hole was filled, nothing else was lost
    rings = [d for d in expected if d["class_id"] == RING]
    assert done.loss.holes == len(rings) > 0
    hole_px = sum(int(ndimage.binary_fill_holes(d["mask"]).sum() - d["mask"].sum()) for d in rings)
    assert done.loss.hole_px == hole_px
    assert done.loss.mask_px == sum(int(d["mask"].sum()) for d in expected)
    assert done.loss.dropped_parts == done.loss.dropped_px == done.loss.multi_part == 0
    for det, *polygons in by_det.values():
        h, w = det["mask"].shape
        filled = ndimage.binary_fill_holes(det["mask"])  # polygons carry no holes
        drawn = _rasterise(polygons, h, w)
        iou = (drawn & filled).sum() / (drawn | filled).sum()
        assert iou > 0.95, iou
        assert len(polygons) == 1  # a ring is one outer polygon, its hole dropped


def test_labeling_config_and_cli(synthetic, tmp_path, capsys):
    from sam3ray.analytics import categories
    from sam3ray.cli import main

    xml = ET.fromstring(labeling_config(categories(synthetic.loc), "polygon"))
    assert xml.find("Image").get("name") == "image"
    labels = xml.find("PolygonLabels")
    assert labels.get("toName") == "image"
    assert {lab.get("value") for lab in labels} == set(NAMES.values())
    out, cfg = tmp_path / "ls.json", tmp_path / "config.xml"
    args = ["--format", "polygon", "--labeling-config", str(cfg), "--concepts", "ring"]
    code = main(["export", "labelstudio", synthetic.output, "--out", str(out), *args])
    assert code == 0
    assert "Label Studio:" in capsys.readouterr().out
    tasks = json.loads(out.read_text(encoding="utf-8"))
    kinds = {r["value"]["polygonlabels"][0] for t in tasks for p in t["predictions"]
             for r in p["result"]}  # fmt: skip
    assert kinds == {"ring"}
    assert "BrushLabels" not in cfg.read_text(encoding="utf-8")


def _one_image_output(tmp_path, masks: list[np.ndarray], uris: list[str] | None = None):
    """An output of one 90 x 120 image with a detection per mask (scores 0.9, 0.8, ...);
    ``uris`` adds one ok image without detections per URI."""
    from sam3ray.core.masks import encode_rle
    from sam3ray.output.schema import detections_table, images_table
    from sam3ray.output.writer import ShardOutput, ShardWriter

    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(image)
    uri = str(image)
    dets = []
    for k, mask in enumerate(masks):
        counts, area = encode_rle(mask)
        dets.append({"run_id": "r1", "image_id": "i1", "uri": uri, "class_id": CIRCLE,
                     "concept": "circle", "query": 'text:"circle"', "score": 0.9 - k / 10,
                     "box": [10, 5, 110, 86], "mask_rle": counts, "mask_size": [90, 120],
                     "area": area, "width": 120, "height": 90, "model": MODEL})  # fmt: skip
    imgs = [{"run_id": "r1", "image_id": "i1", "uri": uri, "shard_id": "s1", "status": "ok",
             "n_detections": len(dets), "width": 120, "height": 90}]  # fmt: skip
    for k, other in enumerate(uris or []):
        imgs.append({"run_id": "r1", "image_id": f"i{k + 2}", "uri": other, "shard_id": "s1",
                     "status": "ok", "n_detections": 0, "width": 120, "height": 90})  # fmt: skip
    out = Location(str(tmp_path / "out"))
    ShardWriter(out).write(ShardOutput("s1", "r1", detections_table(dets),
                                       images_table(imgs)))  # fmt: skip
    return out


def _multi_part_output(tmp_path):
    """An output with one detection of three blobs and a speck on one image."""
    mask = np.zeros((90, 120), bool)
    mask[10:40, 10:50] = True  # 1200 px
    mask[50:80, 60:110] = True  # 1500 px
    mask[5:15, 90:100] = True  # 100 px
    mask[85, 5] = True  # a 1-pixel speck
    return _one_image_output(tmp_path, [mask]), mask


def test_multi_part_detection_is_one_labelled_object(tmp_path):
    """Parts beyond the first are children (``parentID``) of the detection's region, with
    its label and score; the speck under ``min_part_px`` is left out and reported."""
    out, mask = _multi_part_output(tmp_path)
    done = export_labelstudio(out, Location(str(tmp_path / "t.json")), fmt="polygon")
    (task,) = json.loads((tmp_path / "t.json").read_text())
    (pred,) = task["predictions"]
    first, *children = pred["result"]
    assert "parentID" not in first and len(children) == 2
    assert all(c["parentID"] == first["id"] for c in children)
    assert {(c["value"]["polygonlabels"][0], c["score"]) for c in pred["result"]} == {
        ("circle", 0.9)
    }
    assert pred["score"] == 0.9  # the prediction's score counts the detection once
    assert (done.detections, done.results) == (1, 3)
    loss = done.loss
    assert (loss.dropped_parts, loss.dropped_px, loss.multi_part, loss.holes) == (1, 1, 1, 0)
    drawn = _rasterise([r["value"]["points"] for r in pred["result"]], 90, 120)
    expected = mask.copy()
    expected[85, 5] = False
    assert np.array_equal(drawn, expected)  # axis-aligned parts come back exactly
    # ... because their vertices lie on pixel edges, in percent of the image's size
    xs, ys = zip(*first["value"]["points"])  # the largest part: rows 50..80, columns 60..110
    assert (min(xs), max(xs)) == pytest.approx((60 / 1.2, 110 / 1.2), abs=1e-4)
    assert (min(ys), max(ys)) == pytest.approx((50 / 0.9, 80 / 0.9), abs=1e-4)


@pytest.mark.parametrize("fmt", ["polygon", "rle"])
def test_empty_masks_are_counted_not_drawn(tmp_path, fmt, capsys):
    """An all-zero mask has nothing to draw: no region (an invisible one would have to be
    deleted by hand), but counted, and the CLI says so instead of "N detections as N-1
    regions" with one unaccounted for."""
    from sam3ray.cli import main

    square = np.zeros((90, 120), bool)
    square[10:40, 10:50] = True
    out = _one_image_output(tmp_path, [square, np.zeros((90, 120), bool)])
    done = export_labelstudio(out, Location(str(tmp_path / "t.json")), fmt=fmt)
    (task,) = json.loads((tmp_path / "t.json").read_text())
    (pred,) = task["predictions"]
    (region,) = pred["result"]
    assert region["score"] == 0.9 and pred["score"] == 0.9  # the empty one (0.8) is not in
    assert (done.detections, done.results, done.empty) == (2, 1, 1)
    if fmt == "polygon":
        assert done.loss.mask_px == square.sum() and done.loss.multi_part == 0
    assert main(["export", "labelstudio", out.uri, "--out", str(tmp_path / "c.json"),
                 "--format", fmt]) == 0  # fmt: skip
    assert "2 detections (1 with an empty mask, not drawn) as 1 regions" in capsys.readouterr().out


def test_vertices_are_bounded_per_region(tmp_path):
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:200, :200]
    radius = 70 + 12 * np.sin(np.arctan2(yy - 100, xx - 100) * 40)  # a 40-point star
    mask = np.hypot(yy - 100, xx - 100) < radius + rng.normal(0, 2, (200, 200))
    from sam3ray.core.masks import outline_mask

    free = outline_mask(mask, max_points=10_000)
    bounded = outline_mask(mask, max_points=24)
    assert len(free.parts[0]) > 24 >= max(len(p) for p in bounded.parts)
    assert bounded.tolerance > free.tolerance == 1.0  # the tolerance it took is reported


def test_image_urls_for_local_files_and_presigned(synthetic, tmp_path, moto_s3):
    from urllib.parse import parse_qs, urlsplit
    from urllib.request import urlopen

    from sam3ray.analytics.labelstudio import image_url

    root = str(Path(synthetic.output).parent)
    tasks, done = _export(synthetic, tmp_path, local_files_root=root)
    for task in tasks:
        url = task["data"]["image"]
        assert url.startswith("/data/local-files/?d=")
        rel = parse_qs(urlsplit(url).query)["d"][0]
        assert Path(root, rel).read_bytes() == Path(task["data"]["sam3ray_uri"]).read_bytes()
    assert done.storage_path == str(Path(root) / "images") and done.bare_local == 0
    with pytest.raises(ValueError, match="not under the local files root"):
        _export(synthetic, tmp_path, local_files_root=str(tmp_path / "elsewhere"))
    _, bare = _export(synthetic, tmp_path)
    assert bare.bare_local == len(synthetic.ok_images)  # said, not silently broken

    bucket = moto_s3.new_bucket("ls-urls")
    uri = moto_s3.put(bucket, "a/b c.png", b"\x89PNG-bytes")
    s3 = Location(f"s3://{bucket}/out", moto_s3.storage_options)
    assert image_url(uri, s3) == uri  # for a cloud storage connection of the project
    signed = image_url(uri, s3, presign=600)
    assert signed.startswith(moto_s3.endpoint_url) and "Signature" in signed
    with urlopen(signed, timeout=30) as response:  # noqa: S310 - moto on 127.0.0.1
        assert response.read() == b"\x89PNG-bytes"


def test_mixed_lake_gets_both_url_kinds_in_one_export(tmp_path, moto_s3, capsys):
    """A lake with local and object-store images: ``--local-files-root`` and
    ``--presign`` together, each image's URL made by the kind of its URI."""
    from urllib.parse import parse_qs, urlsplit
    from urllib.request import urlopen

    from sam3ray.cli import main

    bucket = moto_s3.new_bucket("ls-mixed")
    remote = moto_s3.put(bucket, "photos/a.png", b"\x89PNG-remote")
    square = np.zeros((90, 120), bool)
    square[10:40, 10:50] = True
    out = _one_image_output(tmp_path, [square], uris=[remote])
    opts = ["key=testing", "secret=testing", "client_kwargs.region_name=us-east-1",
            f"client_kwargs.endpoint_url={moto_s3.endpoint_url}"]  # fmt: skip
    target = tmp_path / "tasks.json"
    argv = [
        "export",
        "labelstudio",
        out.uri,
        "--out",
        str(target),
        "--presign",
        "600",
        "--local-files-root",
        str(tmp_path),
        *(f"--storage-option={o}" for o in opts),
    ]
    assert main(argv) == 0
    urls = {t["data"]["sam3ray_uri"]: t["data"]["image"]
            for t in json.loads(target.read_text())}  # fmt: skip
    local = urls[str(tmp_path / "img.png")]
    assert parse_qs(urlsplit(local).query)["d"] == ["img.png"]
    assert local.startswith("/data/local-files/?d=")
    assert urls[remote].startswith(moto_s3.endpoint_url) and "Signature" in urls[remote]
    with urlopen(urls[remote], timeout=30) as response:  # noqa: S310 - moto on 127.0.0.1
        assert response.read() == b"\x89PNG-remote"
    printed = capsys.readouterr().out
    assert f"Local Files storage on {tmp_path}" in printed
    assert "cloud storage" not in printed  # presigned: no storage needed for the bucket


def test_cli_warns_once_about_bare_local_paths(synthetic, tmp_path, capsys, caplog):
    """The library's warning is the one a CLI user sees; the CLI does not repeat it."""
    from sam3ray.cli import main

    with caplog.at_level(logging.WARNING, logger="sam3ray"):
        argv = ["export", "labelstudio", synthetic.output, "--out", str(tmp_path / "t.json")]
        assert main(argv) == 0
    streams = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records if "cannot load" in r.getMessage()]
    assert "cannot load" not in streams.out + streams.err  # printed: not a second time
    (message,) = logged
    assert f"{len(synthetic.ok_images)} images are local paths" in message
    assert "--local-files-root" in message  # says what to do, in the CLI's words too


def test_polygon_flag_defaults_match_the_library():
    """The CLI's help states the polygon defaults without importing them (fast --help)."""
    from dataclasses import fields

    from sam3ray.analytics.labelstudio import PolygonOptions
    from sam3ray.cli.main import build_parser

    parser = build_parser()
    export = next(a for a in parser._subparsers._group_actions[0].choices["export"]._actions
                  if a.dest == "export_format")  # fmt: skip
    helps = {a.dest: a.help for a in export.choices["labelstudio"]._actions}
    for f in fields(PolygonOptions):
        assert f"default {f.default:g})" in helps[f.name], (f.name, helps[f.name])
