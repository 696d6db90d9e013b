"""Small synthetic videos (moving shapes) for tests, demos and benchmarks.

Generated with PyAV so every container the job reads (MP4, MOV, MKV, WebM)
and the awkward cases (variable frame rate, unknown codec, truncation) can be
produced on the spot instead of shipping binary fixtures.
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path

import numpy as np

#: (container format, codec) per file extension.
FORMATS = {
    ".mp4": ("mp4", "libx264"),
    ".mov": ("mov", "libx264"),
    ".mkv": ("matroska", "libx264"),
    ".webm": ("webm", "libvpx"),
}


def moving_shapes_frame(i: int, height: int, width: int) -> np.ndarray:
    """Frame ``i``: a red square moving right, a blue disc moving down, on grey."""
    img = np.full((height, width, 3), 60, np.uint8)
    s = max(8, min(height, width) // 5)
    x = (6 + 3 * i) % max(1, width - s)
    img[height // 4 : height // 4 + s, x : x + s] = (220, 40, 40)
    yy, xx = np.ogrid[:height, :width]
    cy = (10 + 2 * i) % max(1, height - s) + s // 2
    disc = (yy - cy) ** 2 + (xx - (3 * width) // 4) ** 2 <= (s // 2) ** 2
    img[disc] = (40, 60, 220)
    return img


def write_video(
    path: str | os.PathLike,
    n_frames: int = 64,
    size: tuple[int, int] = (144, 192),
    fps: int = 24,
    *,
    variable_rate: bool = False,
    gop: int = 12,
) -> Path:
    """Write a moving-shapes video; the container follows the file extension."""
    import av

    path = Path(path)
    fmt, codec = FORMATS[path.suffix.lower()]
    h, w = size
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        if variable_rate:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        t = 0
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(moving_shapes_frame(i, h, w), format="rgb24")
            if variable_rate:  # alternate 20 ms and 40 ms gaps
                frame.pts, frame.time_base = t, fractions.Fraction(1, 1000)
                t += 40 if i % 2 else 20
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(path: str | os.PathLike, n_frames: int = 24, size=(144, 192)) -> Path:
    """A ``*.frames`` folder of JPEGs named 0.jpg, 1.jpg, … (natural order matters)."""
    from PIL import Image

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_frames):
        Image.fromarray(moving_shapes_frame(i, *size)).save(path / f"{i}.jpg", quality=92)
    return path


def unknown_codec_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """An MKV whose codec id no decoder knows (same bytes, codec id renamed)."""
    data = Path(src).read_bytes()
    if b"V_MPEG4/ISO/AVC" not in data:
        raise ValueError(f"{src} is not an H.264 Matroska file")
    Path(dst).write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))
    return Path(dst)


def truncated_copy(src: str | os.PathLike, dst: str | os.PathLike, keep: float = 0.5) -> Path:
    """The first ``keep`` fraction of a file's bytes (an interrupted upload)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: max(1, int(len(data) * keep))])
    return Path(dst)
