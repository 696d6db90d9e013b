"""Label Studio export: the brush RLE codec against the converter's algorithm, and the tasks."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET

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
    mask_to_percent_polygons,
)

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


def _tasks(synthetic, tmp_path, **kwargs) -> list[dict]:
    out = tmp_path / "tasks.json"
    done = export_labelstudio(synthetic.loc, synthetic.at(str(out)), **kwargs)
    tasks = json.loads(out.read_text(encoding="utf-8"))
    assert done.tasks == len(tasks)
    assert done.results == sum(len(p["result"]) for t in tasks for p in t["predictions"])
    return tasks


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

    tasks = _tasks(synthetic, tmp_path, fmt="polygon", concepts=["circle", "ring"], min_score=0.4)
    by_det: dict[tuple, list] = {}
    for task in tasks:
        _check_task(task, synthetic, "polygonlabels")
        truth = _truth(synthetic, task)
        for r in (r for p in task["predictions"] for r in p["result"]):
            assert r["value"]["closed"] is True
            assert all(0 <= c <= 100 for pt in r["value"]["points"] for c in pt)
            det = truth[(r["value"]["polygonlabels"][0], r["score"])]
            by_det.setdefault(id(det), [det]).append(r["value"]["points"])
    expected = [d for d in synthetic.detections if d["class_id"] in (CIRCLE, RING)
                and d["frame_index"] is None and d["score"] >= 0.4]  # fmt: skip
    assert len(by_det) == len(expected) > 3
    for det, *polygons in by_det.values():
        h, w = det["mask"].shape
        filled = ndimage.binary_fill_holes(det["mask"])  # polygons carry no holes
        drawn = _rasterise(polygons, h, w)
        iou = (drawn & filled).sum() / (drawn | filled).sum()
        assert iou > 0.95, iou
        assert len(polygons) == 1  # a ring is one outer polygon, its hole dropped
    square = np.zeros((20, 30), bool)
    square[5:15, 10:20] = True  # axis-aligned edges land exactly on pixel edges
    (outline,) = mask_to_percent_polygons(square)
    xs, ys = [p[0] * 30 / 100 for p in outline], [p[1] * 20 / 100 for p in outline]
    assert (min(xs), max(xs), min(ys), max(ys)) == pytest.approx((10, 20, 5, 15))


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
