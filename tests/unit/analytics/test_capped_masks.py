"""Masks stored on a grid capped by ``inference.max_imgsz`` (``mask_size`` smaller than
the image) are exported at the image's size: COCO and Label Studio tie a mask to
its image's pixels, and boxes stay in the image's pixels. Areas follow: COCO's is the
exported mask's, the stats' mean is in image pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_scan import CIRCLE, MODEL, NAMES, _img

from sam3ray.analytics.coco import export_coco
from sam3ray.analytics.labelstudio import brush_rle_to_mask, export_labelstudio
from sam3ray.analytics.stats import compute_stats
from sam3ray.core.ids import input_id
from sam3ray.core.masks import decode_rle, encode_rle, mask_at, rle_at
from sam3ray.output.schema import detections_table, images_table
from sam3ray.output.writer import ShardOutput, ShardWriter, write_run_summary
from sam3ray.storage.location import Location

H, W = 150, 200  # the image
GH, GW = 60, 80  # the capped mask grid (long side 80)
RUN = "20260101T000000Z-aaaaaa"


def test_mask_at_scales_by_nearest_pixel_centres():
    grid = np.zeros((2, 3), bool)
    grid[0, 1] = grid[1, 2] = True
    up = mask_at(grid, (4, 6))
    assert up.shape == (4, 6) and up[:2, 2:4].all() and up[2:, 4:].all()
    assert up.sum() == 8
    assert mask_at(grid, (2, 3)) is grid
    counts, _ = encode_rle(grid)
    assert rle_at(counts, (2, 3), (2, 3)) == (counts, 2)
    scaled, area = rle_at(counts, (2, 3), (4, 6))
    assert np.array_equal(decode_rle(scaled, (4, 6)), up) and area == 8


def _grid() -> np.ndarray:
    yy, xx = np.mgrid[0:GH, 0:GW]
    return (xx - 40) ** 2 + (yy - 30) ** 2 <= 15**2


def _output(tmp_path) -> tuple[Location, np.ndarray, str]:
    """One image of H x W with one circle stored on the GH x GW grid; the circle at the
    image's size (what the exports must carry) and the image's URI."""
    out = Location(str(tmp_path / "out"))
    uri = str(tmp_path / "img.png")
    grid = _grid()
    counts, area = encode_rle(grid)
    det = {"run_id": RUN, "image_id": input_id(uri), "uri": uri, "class_id": CIRCLE,
           "concept": NAMES[CIRCLE], "query": 'text:"circle"', "score": 0.9,
           "box": [62.5, 37.5, 137.5, 112.5], "mask_rle": counts, "mask_size": [GH, GW],
           "area": area, "width": W, "height": H, "model": MODEL}  # fmt: skip
    img = _img(RUN, "s1", uri, "ok", n=1, width=W, height=H)
    ShardWriter(out).write(ShardOutput("s1", RUN, detections_table([det]), images_table([img])))
    summary = {"run_id": RUN, "status": "succeeded", "config": {}}
    write_run_summary(out, RUN, summary)
    return out, mask_at(grid, (H, W)), uri


def test_coco_segmentations_are_at_the_images_size(tmp_path):
    out, want, _ = _output(tmp_path)
    target = Location(str(tmp_path / "coco.json"))
    export_coco(out, target)
    doc = json.loads(target.read_bytes())
    (image,) = doc["images"]
    (ann,) = doc["annotations"]
    assert (image["height"], image["width"]) == (H, W)
    assert ann["segmentation"]["size"] == [H, W]
    got = decode_rle(ann["segmentation"]["counts"].encode(), (H, W))
    assert np.array_equal(got, want)
    # the area of the exported mask, not the grid's (COCOeval's area ranges are in image px)
    assert ann["area"] == want.sum() > 6 * _grid().sum()
    assert ann["bbox"] == [62.5, 37.5, 75.0, 75.0]  # boxes were in image pixels already


def test_stats_mask_area_is_in_image_pixels(tmp_path):
    """Grids differ per image (the cap keeps the aspect ratio): a mean over grid pixels
    would mix units. The mean is the grid area scaled by image pixels per grid pixel."""
    out, want, _ = _output(tmp_path)
    grid_area = int(_grid().sum())
    (row,) = (r for r in compute_stats(out).concepts.to_pylist() if r["class_id"] == CIRCLE)
    assert row["mask_area_mean"] == pytest.approx(grid_area * (H * W) / (GH * GW))
    assert row["mask_area_mean"] == pytest.approx(want.sum(), rel=0.02)  # what exports carry


def test_label_studio_brushes_are_at_the_images_size(tmp_path):
    out, want, _ = _output(tmp_path)
    target = Location(str(tmp_path / "ls.json"))
    export_labelstudio(out, target, fmt="rle")
    (task,) = json.loads(target.read_bytes())
    (region,) = task["predictions"][0]["result"]
    assert (region["original_height"], region["original_width"]) == (H, W)
    assert np.array_equal(brush_rle_to_mask(region["value"]["rle"], H, W), want)
