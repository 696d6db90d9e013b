"""Poison inputs, generated in memory (no binary blobs in the repository).

Each :class:`BadInput` says what the job must make of it: ``status="ok"`` with the
(height, width) of the upright image, or ``status="error"`` with the error reason
code that ``sources.images`` / the segment stage give it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tests.support.images import encode, scene

#: The default ``input.max_pixels`` (Pillow's own bomb limit is half of it).
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class BadInput:
    name: str  # file name, extension included (the extension may lie)
    data: bytes
    status: str  # "ok" | "error"
    reason: str | None = None  # error_reason for status "error"
    size: tuple[int, int] | None = None  # (height, width) for status "ok", upright


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 20_000, height: int = 10_000) -> bytes:
    """A *valid* 1-bit PNG of ``width*height`` pixels, all zero: ~25 KB on disk.

    Fully decoded as RGB it would take ``3*width*height`` bytes (600 MB by default),
    so it must be refused from its header. The IDAT stream is real (compressed
    row by row), so a decoder that ignored the header would really expand it.
    """
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def gradient(h: int, w: int) -> np.ndarray:
    """A colour ramp of any size (synthetic_scene needs both sides above 20 px)."""
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return ramp.astype(np.uint8)


def exif_rotated_jpeg() -> bytes:
    """Stored 96 wide x 48 tall with EXIF orientation 6: upright it is 48 wide x 96 tall."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(scene(7, (48, 96))), "JPEG", quality=92, exif=exif.tobytes())


def palette_png_with_transparency() -> bytes:
    im = Image.fromarray(scene(8, (40, 56))).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(im, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.fromarray(scene(s, (40, 52))) for s in (9, 10, 11)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


def png16() -> bytes:
    values = (np.arange(44 * 60, dtype=np.uint32).reshape(44, 60) * 24).astype(np.uint16)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    return encode(im, "PNG")


def cmyk_jpeg() -> bytes:
    rgb = Image.fromarray(scene(12, (50, 70)))
    return encode(rgb.convert("CMYK"), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(scene(13, (96, 96))), "JPEG", quality=90)
    return data[: len(data) // 2]


def bad_inputs() -> list[BadInput]:
    """Every poison and odd-but-valid file the job must survive (no S3-only cases)."""
    rng = np.random.default_rng(42)
    return [
        BadInput("zero-bytes.jpg", b"", "error", "empty"),
        BadInput("truncated.jpg", truncated_jpeg(), "error", "truncated"),
        BadInput("random-bytes.jpg", rng.bytes(3000), "error", "not_an_image"),
        BadInput("text.png", b"<html><body>Access denied</body></html>\n", "error", "not_an_image"),
        BadInput("bomb.png", png_bomb(), "error", "too_large"),
        BadInput(
            "one-pixel.png",
            encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
            "ok",
            size=(1, 1),
        ),  # fmt: skip
        BadInput(
            "panorama.png",
            encode(Image.fromarray(gradient(20, 20000)), "PNG"),
            "ok",
            size=(20, 20000),
        ),  # fmt: skip
        BadInput("cmyk.jpg", cmyk_jpeg(), "ok", size=(50, 70)),
        BadInput("sixteen-bit.png", png16(), "ok", size=(44, 60)),
        BadInput("palette-alpha.png", palette_png_with_transparency(), "ok", size=(40, 56)),
        BadInput("animated.gif", animated_gif(), "ok", size=(40, 52)),
        BadInput("exif-rotated.jpg", exif_rotated_jpeg(), "ok", size=(96, 48)),
    ]


def good_inputs(n: int = 4) -> list[BadInput]:
    """Ordinary images that must come out ok next to the poison ones."""
    return [
        BadInput(
            f"good-{i}.png",
            encode(Image.fromarray(scene(100 + i, (64, 80))), "PNG"),
            "ok",
            size=(64, 80),
        )  # fmt: skip
        for i in range(n)
    ]
