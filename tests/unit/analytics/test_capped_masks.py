"""Masks stored on a grid capped by ``inference.max_imgsz`` (``mask_size`` smaller than
the image) are exported at the image's size: COCO and Label Studio tie a mask to
its image's pixels, and boxes stay in the image's pixels."""

from __future__ import annotations

import json

import numpy as np
from test_scan import CIRCLE, MODEL, NAMES, _img

from sam3ray.analytics.coco import export_coco
from sam3ray.analytics.labelstudio import brush_rle_to_mask, export_labelstudio
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
    assert rle_at(counts, (2, 3), (2, 3)) == counts
    assert np.array_equal(decode_rle(rle_at(counts, (2, 3), (4, 6)), (4, 6)), up)


def _output(tmp_path) -> tuple[Location, np.ndarray, str]:
    out = Location(str(tmp_path / "out"))
    uri = str(tmp_path / "img.png")
    yy, xx = np.mgrid[0:GH, 0:GW]
    grid = (xx - 40) ** 2 + (yy - 30) ** 2 <= 15**2
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
    assert ann["bbox"] == [62.5, 37.5, 75.0, 75.0]  # boxes were in image pixels already


def test_label_studio_brushes_are_at_the_images_size(tmp_path):
    out, want, _ = _output(tmp_path)
    target = Location(str(tmp_path / "ls.json"))
    export_labelstudio(out, target, fmt="rle")
    (task,) = json.loads(target.read_bytes())
    (region,) = task["predictions"][0]["result"]
    assert (region["original_height"], region["original_width"]) == (H, W)
    assert np.array_equal(brush_rle_to_mask(region["value"]["rle"], H, W), want)
