"""Mask encodings shared by the engine, the writer and the exporters.

Masks leave the GPU as COCO run-length encodings: a 1000×1000 mask is ~1 MB as
a bitmap and typically a few hundred bytes as compressed RLE, and every COCO
tool reads it back. ``mask_rle`` stores pycocotools' compressed ``counts``
bytes; ``mask_size`` is ``(h, w)``.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> tuple[bytes, int]:
    """(compressed COCO counts, area) of one boolean H×W mask."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return rle["counts"], int(mask_utils.area(rle))


def encode_rle_batch(masks: np.ndarray) -> list[tuple[bytes, int]]:
    """Encode N×H×W boolean masks in one pycocotools call."""
    if masks.ndim != 3:
        raise ValueError(f"expected N×H×W masks, got shape {masks.shape}")
    return encode_rle_fortran(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def encode_rle_fortran(masks_hwn: np.ndarray) -> list[tuple[bytes, int]]:
    """Encode an H×W×N uint8 Fortran-ordered stack (what pycocotools works on)
    without copying; producers that can lay masks out this way save a transpose."""
    if masks_hwn.ndim != 3 or not masks_hwn.flags.f_contiguous or masks_hwn.dtype != np.uint8:
        raise ValueError("expected an H×W×N uint8 Fortran-contiguous array")
    if masks_hwn.shape[2] == 0:
        return []
    rles = mask_utils.encode(masks_hwn)
    return [(r["counts"], int(a)) for r, a in zip(rles, mask_utils.area(rles))]


def decode_rle(counts: bytes, size: tuple[int, int] | list[int]) -> np.ndarray:
    """Boolean H×W mask from compressed counts and ``(h, w)``."""
    h, w = int(size[0]), int(size[1])
    return mask_utils.decode({"counts": counts, "size": [h, w]}).astype(bool)


def rle_iou(a: bytes, b: bytes, size: tuple[int, int]) -> float:
    """IoU of two compressed RLEs of the same size, without decoding them."""
    h, w = int(size[0]), int(size[1])
    ra = {"counts": a, "size": [h, w]}
    rb = {"counts": b, "size": [h, w]}
    return float(mask_utils.iou([ra], [rb], [0])[0][0])


def rle_bbox(counts: bytes, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Tight xyxy box of a compressed RLE (empty mask -> zeros)."""
    x, y, w, h = mask_utils.toBbox({"counts": counts, "size": [int(size[0]), int(size[1])]})
    return float(x), float(y), float(x + w), float(y + h)


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0) -> list[list[float]]:
    """Outer contours of a boolean mask as flat ``[x0, y0, x1, y1, ...]`` pixel-edge lists.

    Label tools that cannot read RLE (Label Studio polygons, CVAT, COCO polygons)
    need polygons. Coordinates are on pixel edges (a pixel square spans x..x+1),
    as COCO rasterises them, and holes are dropped: a hole's contour returned as
    another polygon would be drawn as a filled region of the class.
    """
    from skimage import measure

    h, w = mask.shape
    polygons = []
    for contour in measure.find_contours(np.pad(mask.astype(np.uint8), 1), 0.5):
        rc = measure.approximate_polygon(contour, tolerance) - 0.5  # padded centres -> edges
        x, y = rc[:, 1], rc[:, 0]
        if len(rc) < 4 or np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) <= 0:
            continue  # a hole (clockwise in x, y) or a degenerate sliver
        xy = np.stack([np.clip(x, 0, w), np.clip(y, 0, h)], axis=1)[:-1]  # drop closing repeat
        polygons.append(np.round(xy, 2).ravel().tolist())
    return polygons
