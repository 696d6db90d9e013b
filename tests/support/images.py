"""The one generator of test images: deterministic synthetic scenes, encoded as asked."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sam3ray.demo.images import synthetic_scene


def scene(seed: int, size: tuple[int, int]) -> np.ndarray:
    """An H×W×3 uint8 scene (colour gradient, rectangles and ellipses) of ``size`` (h, w)."""
    return synthetic_scene(seed, size)


def encode(im: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    """``im`` saved as ``fmt`` (PNG, JPEG, ...) in memory."""
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    if fmt == "JPEG":
        kw.setdefault("quality", 90)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def scene_bytes(seed: int, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    """A scene encoded as ``fmt``."""
    return encode(scene(seed, size), fmt)
