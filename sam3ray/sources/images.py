"""Image bytes to an RGB ``uint8`` array, or a :class:`DecodeError` with a short reason.

At petabyte scale every odd file exists somewhere: 16-bit scans, CMYK JPEGs,
palette PNGs, phone photos stored sideways with an EXIF flag, truncated uploads,
HTML error pages saved as ``.jpg``, and decompression bombs. Each must become
either a correct RGB image or one error row with a machine-friendly reason;
never a crashed worker and never a silently wrong image.

Choices made here:
- Alpha is dropped after converting to RGBA (colour channels kept as stored);
  compositing would darken semi-transparent edges depending on a background
  colour nobody chose.
- Single-channel integer data within 0..65535 (16-bit PNG/TIFF, also when Pillow
  opens it as 32-bit "I") is scaled by 255/65535; other integer ranges and float
  data outside [0, 1] are min-max scaled; floats in [0, 1] are scaled by 255.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam3ray.core.errors import DecodeError

logger = logging.getLogger(__name__)

#: Formats decoded (JPEG covers MPO, which the JPEG opener returns). Others are
#: refused: EPS would run Ghostscript, and PSD/ICO/… are not photos we label.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF")

# Pillow's bomb limit is a process global read during open/load. It is relaxed only
# under this lock and only for the calls of this module; our own per-job limit
# (``max_pixels``) is checked from the header before any pixel is decoded.
_PIL_LIMIT_LOCK = threading.RLock()


@contextmanager
def _pil_limit_off(active: bool = True) -> Iterator[None]:
    if not active:
        yield
        return
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


_DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, IndexError)


def _broken(exc: BaseException, fmt: str | None) -> DecodeError:
    """Map a Pillow failure on recognised data to "truncated" or "corrupt"."""
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncat" in text or "broken data stream" in text:
        return DecodeError("truncated", f"{fmt or 'image'} data ends early: {exc}")
    return DecodeError("corrupt", f"{fmt or 'image'} data cannot be decoded: {exc}")


def _open(data: bytes) -> Image.Image:
    with _pil_limit_off():
        try:
            return Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            pass
        except _DECODE_ERRORS as exc:  # a known format whose header is cut or broken
            raise _broken(exc, None) from None
        try:  # identify only, to tell "a format we refuse" from "not an image"
            other = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise DecodeError("not_an_image", "bytes are not a recognised image") from None
        raise DecodeError("unsupported", f"image format {other.format} is not supported")


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Integer/float single-channel data to 0..255, scaled (never clipped)."""
    if arr.dtype == np.uint16 or (
        arr.dtype.kind in "iu" and arr.size and arr.min() >= 0 and arr.max() <= 65535
    ):
        # 16-bit range: 65535 -> 255, rounding to nearest (x / 257).
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    is_float, arr = arr.dtype.kind == "f", arr.astype(np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if is_float and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0  # float images in [0, 1]
    scaled = (np.nan_to_num(arr, nan=lo) - lo) / ((hi - lo) or 1.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(im))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DecodeError("unsupported", f"colour mode {mode} cannot be converted: {exc}") from None


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode to an (H, W, 3) C-contiguous ``uint8`` RGB array, upright per EXIF.

    The pixel count is checked from the header, before any pixel is decoded, so a
    small file that expands to gigabytes costs nothing. Animated images give their
    first frame.
    """
    if not data:
        raise DecodeError("empty", "zero bytes")
    im = _open(data)
    width, height = im.size
    if width < 1 or height < 1:
        raise DecodeError("not_an_image", f"image has size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            "too_large", f"{width}x{height} = {width * height} pixels exceeds {max_pixels}"
        )
    pil_limit = Image.MAX_IMAGE_PIXELS
    # Some plugins (TIFF tiles, GIF frames) re-check Pillow's limit while loading.
    relax = pil_limit is not None and width * height > pil_limit
    try:
        with _pil_limit_off(relax):
            im.load()
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise _broken(exc, im.format) from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as exc:  # broken EXIF must not cost the image
        logger.warning("ignoring unreadable EXIF orientation: %r", exc)
    rgb = _to_rgb(im)
    return np.ascontiguousarray(np.array(rgb, dtype=np.uint8))
