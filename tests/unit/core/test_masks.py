"""COCO RLE, IoU and outlines (polygons) of sam3ray.core.masks against plain numpy truths."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam3ray.core.masks import (
    decode_rle,
    encode_rle,
    encode_rle_batch,
    outline_mask,
    rle_iou,
)


def blobs(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """n random boolean masks: a few filled rectangles each, plus salt noise."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, h, w), bool)
    for m in out:
        for _ in range(3):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
        m ^= rng.random((h, w)) < 0.02
    return out


def np_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def rasterise(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """How COCO tools (and Label Studio / CVAT imports) turn polygons back into pixels."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)


def flat(parts: list[np.ndarray]) -> list[list[float]]:
    """Outline parts (k x 2 vertex arrays) as COCO's flat ``[x0, y0, x1, y1, ...]`` lists."""
    return [p.ravel().tolist() for p in parts]


SHAPES = [(1, 1), (1, 17), (23, 1), (37, 53), (64, 48)]


@pytest.mark.parametrize("shape", SHAPES)
def test_rle_round_trip_is_exact(shape):
    for m in [*blobs(3, *shape), np.zeros(shape, bool), np.ones(shape, bool)]:
        counts, area = encode_rle(m)
        assert isinstance(counts, bytes)
        assert area == int(m.sum())
        back = decode_rle(counts, shape)
        assert back.dtype == bool and back.shape == shape
        assert np.array_equal(back, m)


def test_rle_accepts_uint8_and_non_contiguous_views():
    m = blobs(1, 40, 60)[0]
    view = m.T[::2]  # neither C- nor Fortran-contiguous
    assert not view.flags["C_CONTIGUOUS"] and not view.flags["F_CONTIGUOUS"]
    counts, area = encode_rle(view)
    assert np.array_equal(decode_rle(counts, view.shape), view) and area == view.sum()
    assert encode_rle(m.astype(np.uint8)) == encode_rle(m)


def test_batch_encode_equals_single_encode():
    masks = blobs(7, 31, 45, seed=3)
    assert encode_rle_batch(masks) == [encode_rle(m) for m in masks]
    strided = masks[::2]  # a view, as the engine may pass
    assert encode_rle_batch(strided) == [encode_rle(m) for m in strided]
    assert encode_rle_batch(np.zeros((0, 5, 5), bool)) == []


def test_wrong_dimensions_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="N×H×W"):
        encode_rle_batch(np.zeros((3, 4), bool))


def test_rle_iou_equals_pixel_iou():
    masks = blobs(6, 50, 70, seed=5)
    enc = [encode_rle(m)[0] for m in masks]
    for i in range(len(masks)):
        assert rle_iou(enc[i], enc[i], (50, 70)) == pytest.approx(1.0)
        for j in range(i + 1, len(masks)):
            assert rle_iou(enc[i], enc[j], (50, 70)) == pytest.approx(np_iou(masks[i], masks[j]))
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[:5], b[5:] = True, True
    assert rle_iou(encode_rle(a)[0], encode_rle(b)[0], (10, 10)) == 0.0


def test_polygons_of_blobs_rasterise_back_to_the_mask():
    h, w = 100, 120
    yy, xx = np.mgrid[:h, :w]
    disc = (xx - 40) ** 2 + (yy - 50) ** 2 < 25**2
    square = (xx >= 80) & (xx < 110) & (yy >= 20) & (yy < 60)
    m = disc | square
    out = outline_mask(m)
    assert len(out.parts) == 2 and out.area == m.sum()  # two separate objects
    assert out.dropped_parts == out.holes == 0
    for p in out.parts:
        assert p.ndim == 2 and p.shape[0] >= 3 and p.shape[1] == 2
        assert p.min() >= 0 and p[:, 0].max() <= w and p[:, 1].max() <= h
    assert np_iou(rasterise(flat(out.parts), h, w), m) >= 0.95
    assert outline_mask(np.zeros((h, w), bool)).parts == []


def test_polygons_use_coco_pixel_edge_coordinates():
    """COCO polygons are in pixel-edge coordinates: the outline of pixels
    x0..x1-1, y0..y1-1 runs from (x0, y0) to (x1, y1) (``rasterise`` of that square
    gives back exactly those pixels). Contour tracers run through pixel centres, half a
    pixel inside that; the outline is moved out onto the edges."""
    m = np.zeros((60, 80), bool)
    m[10:40, 20:60] = True
    (poly,) = outline_mask(m).parts
    assert rasterise([[20, 10, 60, 10, 60, 40, 20, 40]], 60, 80).tolist() == m.tolist()
    extents = (*poly.min(axis=0), *poly.max(axis=0))
    assert extents == pytest.approx((20, 10, 60, 40)), extents
    assert rasterise(flat([poly]), 60, 80).tolist() == m.tolist()


def test_polygons_are_outer_contours_only():
    """The docstring promises outer contours. A hole's contour returned as one more
    polygon becomes a separate filled region of the class in polygon-based label
    tools (Label Studio, CVAT): the hole would be labelled as the object."""
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[15:25, 15:25] = False
    out = outline_mask(ring)
    assert len(out.parts) == 1 and out.holes == 1
    assert rasterise(flat(out.parts), 40, 40).sum() == 30 * 30  # the hole is filled


def test_outline_fills_holes_and_reports_them():
    """A ring with an island in its hole: one polygon (the island lies inside it), one
    hole, and exactly the hole's background pixels reported as covered."""
    m = np.zeros((50, 50), bool)
    m[5:45, 5:45] = True
    m[15:35, 15:35] = False  # a 20×20 hole ...
    m[22:28, 22:28] = True  # ... with a 6×6 island
    out = outline_mask(m)
    assert len(out.parts) == 1 and out.holes == 1
    assert out.hole_px == 20 * 20 - 6 * 6 and out.dropped_px == 0 and out.area == m.sum()
    assert rasterise(flat(out.parts), 50, 50).sum() == 40 * 40  # filled, on pixel edges
    assert outline_mask(np.zeros((4, 4), bool)).parts == []
    line = np.zeros((10, 10), bool)
    line[3, 2:8] = True  # too thin for a polygon: its box
    (box,) = outline_mask(line).parts
    assert rasterise([box.ravel().tolist()], 10, 10).tolist() == line.tolist()
