"""Mask encodings shared by the engine, the writer and the exporters.

Masks leave the GPU as COCO run-length encodings: a 1000×1000 mask is ~1 MB as
a bitmap and typically a few hundred bytes as compressed RLE, and every COCO
tool reads it back. ``mask_rle`` stores pycocotools' compressed ``counts``
bytes; ``mask_size`` is ``(h, w)``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def mask_at(mask: np.ndarray, size: tuple[int, int] | list[int]) -> np.ndarray:
    """``mask`` scaled to ``(h, w)`` by nearest pixel centres (a mask stored on a grid
    capped by ``inference.max_imgsz``, brought to its image's pixels for exporters
    whose formats tie a mask to the image size)."""
    h, w = int(size[0]), int(size[1])
    mh, mw = mask.shape
    if (mh, mw) == (h, w):
        return mask
    rows = np.minimum(((np.arange(h) + 0.5) * mh / h).astype(np.int64), mh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mw / w).astype(np.int64), mw - 1)
    return mask[rows[:, None], cols[None, :]]


def rle_at(
    counts: bytes, size: tuple[int, int] | list[int], to: tuple[int, int]
) -> tuple[bytes, int]:
    """(compressed counts, area) of a mask scaled from ``size`` to ``to`` (see
    :func:`mask_at`). The area is the scaled mask's own pixel count: formats that
    tie a mask to its image (COCO) need both on the same grid, and nearest-pixel
    scaling does not multiply areas exactly."""
    if tuple(int(v) for v in size) == tuple(int(v) for v in to):
        rle = {"counts": counts, "size": [int(size[0]), int(size[1])]}
        return counts, int(mask_utils.area(rle))
    return encode_rle(mask_at(decode_rle(counts, size), to))


def rle_iou(a: bytes, b: bytes, size: tuple[int, int]) -> float:
    """IoU of two compressed RLEs of the same size, without decoding them."""
    h, w = int(size[0]), int(size[1])
    ra = {"counts": a, "size": [h, w]}
    rb = {"counts": b, "size": [h, w]}
    return float(mask_utils.iou([ra], [rb], [0])[0][0])


@dataclass(frozen=True)
class Outline:
    """A mask as polygons, and what polygons could not say.

    ``parts``: one ``k×2`` array of ``(x, y)`` vertices per connected part, in
    pixel-edge coordinates (a pixel square spans x..x+1), largest part first.
    Polygons have no holes, so ``holes`` hole contours are filled (``hole_px``
    pixels outside the mask are covered); ``dropped_parts`` parts of fewer than
    ``min_part_px`` pixels are left out (``dropped_px`` mask pixels not covered).
    ``tolerance`` is the largest Douglas-Peucker tolerance a part needed to stay
    within ``max_points`` vertices.
    """

    parts: list[np.ndarray]
    area: int
    holes: int = 0
    hole_px: int = 0
    dropped_parts: int = 0
    dropped_px: int = 0
    tolerance: float = 0.0


def outline_mask(
    mask: np.ndarray,
    *,
    tolerance: float = 1.0,
    max_points: int = 256,
    min_part_px: int = 0,
    max_parts: int | None = None,
) -> Outline:
    """The outer contours of a boolean mask as simplified polygons (:class:`Outline`).

    Why OpenCV: ``cv2.findContours`` traces a mask's boundary pixels in C about
    40× faster than marching squares, and it tells outer contours from holes
    (``RETR_TREE``), so only outer contours are simplified (``approxPolyDP`` at
    ``tolerance`` px, doubled until a part has at most ``max_points`` vertices)
    and holes are only counted. Parts are sized by the pixels their outline
    encloses (Pick's theorem on the traced contour); those under ``min_part_px``,
    and all but the ``max_parts`` largest, are left out, but the largest part is
    always kept. The traced polygon runs through boundary pixel centres; it is
    moved out by half a pixel (mitred, at most one pixel at sharp corners) onto
    the pixel edges, so an axis-aligned square comes back exactly. A part too
    thin for a polygon (a line or a single pixel) becomes its box. Work is on the
    mask's bounding box only, and per part only in C.
    """
    import cv2

    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return Outline([], 0)
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.ascontiguousarray(np.pad(mask[y0:y1, x0:x1].astype(np.uint8), 1))
    contours, hierarchy = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    parents = hierarchy[0][:, 3]
    top = np.flatnonzero(parents < 0)  # an island inside a hole lies inside its parent
    size = [cv2.contourArea(contours[i]) + len(contours[i]) / 2 + 1 for i in top]
    order = sorted(range(len(top)), key=lambda k: (-size[k], k))
    limit = len(order) if max_parts is None else max(1, max_parts)
    keep = [int(top[k]) for n, k in enumerate(order[:limit]) if n == 0 or size[k] >= min_part_px]
    filled = np.zeros(crop.shape, np.uint8)
    cv2.drawContours(filled, [contours[i] for i in keep], -1, 1, thickness=cv2.FILLED)
    inside = filled.astype(bool)
    polys, used = [], 0.0
    for i in keep:
        poly, tol = _simplify(contours[i], tolerance, max_points)
        used = max(used, tol)
        polys.append(poly)
    offset = np.array([x0 - 1, y0 - 1], np.float64)
    return Outline(
        parts=[p + offset for p in _on_pixel_edges(polys)],
        area=int(np.count_nonzero(mask)),
        holes=int(np.isin(parents, keep).sum()),
        hole_px=int(np.count_nonzero(inside & (crop == 0))),
        dropped_parts=len(top) - len(keep),
        dropped_px=int(np.count_nonzero((crop == 1) & ~inside)),
        tolerance=used,
    )


def _simplify(contour: np.ndarray, tolerance: float, max_points: int) -> tuple[np.ndarray, float]:
    """Douglas-Peucker at ``tolerance``, doubled until at most ``max_points`` vertices."""
    import cv2

    tol = tolerance
    poly = cv2.approxPolyDP(contour, tol, True) if tol > 0 else contour
    while len(poly) > max_points:
        tol = max(tol * 2, 0.5)
        poly = cv2.approxPolyDP(contour, tol, True)
    return poly[:, 0, :], tol


def _on_pixel_edges(polys: list[np.ndarray]) -> list[np.ndarray]:
    """Polygons through boundary pixel centres (pixel indices), each moved half a pixel
    out onto the pixel edges; a polygon too thin for that becomes the box of its pixels.
    All polygons at once: per-polygon numpy calls would cost more than tracing them."""
    if not polys:
        return []
    lengths = np.array([len(p) for p in polys])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    group = np.repeat(np.arange(len(polys)), lengths)
    pts = np.concatenate(polys).astype(np.float64) + 0.5
    idx = np.arange(len(pts))
    last = (starts + lengths - 1)[group]
    nxt = np.where(idx == last, starts[group], idx + 1)
    prev = np.where(idx == starts[group], last, idx - 1)
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * np.add.reduceat(x * y[nxt] - x[nxt] * y, starts)
    edges = pts[nxt] - pts
    tangent = edges / np.maximum(np.hypot(edges[:, 0], edges[:, 1]), 1e-12)[:, None]
    sign = np.where(area > 0, 1.0, -1.0)[group][:, None]
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1) * sign
    before = normal[prev]  # the normal of the edge that ends at each vertex
    cos = np.sum(before * normal, axis=1, keepdims=True)
    moved = pts + 0.5 * (before + normal) / np.maximum(1 + cos, 0.5)  # mitre, at most 1 px
    out = []
    for k, (s, n) in enumerate(zip(starts, lengths)):
        if n >= 3 and abs(area[k]) >= 1.0:
            out.append(moved[s : s + n])
        else:  # a line or a pixel: the box of its pixels
            lo, hi = pts[s : s + n].min(axis=0) - 0.5, pts[s : s + n].max(axis=0) + 0.5
            out.append(np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]]))
    return out
