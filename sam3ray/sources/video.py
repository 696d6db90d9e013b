"""Video inputs: recognise them, probe them, and decode one shard's frames.

Two kinds of video input share one interface:

- **files** (``.mp4 .mov .mkv .webm``), read with PyAV through fsspec file
  objects, so ``s3://`` and every other fsspec URI work without a local copy;
- **frame folders**: a folder whose name ends in ``.frames`` (e.g.
  ``s3://b/clips/cam1.frames/000001.jpg …``) is one video whose frames are
  its JPEG files in natural order (``2.jpg`` before ``10.jpg``). Frame folders
  have no clock: their ``fps`` is unknown and ``timestamp_s`` stays null.

Decoding a shard seeks to the keyframe at or before its first frame and
decodes forward, so a shard never decodes the video from its start. A frame's
index comes from its presentation timestamp; a timestamp off the constant
frame-rate grid means the video has a variable frame rate, which the frame
numbering of the output cannot represent, so it is refused (an error row).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from sam3ray.core.errors import DecodeError
from sam3ray.core.shards import InputRef, VideoInfo
from sam3ray.sources.images import decode_image
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm")
FRAME_FOLDER_SUFFIX = ".frames"
FRAME_EXTENSIONS = (".jpg", ".jpeg")
#: How far (in frames) a timestamp may sit off the constant-rate grid (MKV's 1 ms clock: 0.01).
_GRID_TOLERANCE = 0.25
_READ_BLOCK = 8 * 1024 * 1024
_MAX_PIXELS = 178_956_970  # input.max_pixels' default: a frame is never a decompression bomb

OnFrame = Callable[[int, np.ndarray, "float | None"], None]


def is_video_uri(uri: str) -> bool:
    """True for video files (by extension) and ``*.frames`` folders."""
    low = uri.lower().rstrip("/")
    return low.endswith(VIDEO_EXTENSIONS) or low.endswith(FRAME_FOLDER_SUFFIX)


def frame_folder_of(uri: str) -> str | None:
    """The ``*.frames`` folder a JPEG URI lies directly in, or None."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if head.lower().endswith(FRAME_FOLDER_SUFFIX) and name.lower().endswith(FRAME_EXTENSIONS):
        return head
    return None


def collapse_frame_folders(refs: Iterable[InputRef]) -> list[InputRef]:
    """Replace the JPEGs of every ``*.frames`` folder by one input for the folder.

    ``inputs.list_inputs`` lists files; call this on its result so a frame
    folder becomes one video input (its ``image_id`` is the folder URI's id).
    """
    out: dict[str, InputRef] = {}
    for ref in refs:
        folder = frame_folder_of(ref.uri)
        uri = folder if folder is not None else ref.uri.rstrip("/")
        out.setdefault(uri, ref if folder is None else InputRef.of(uri))
    return [out[u] for u in sorted(out)]


def _natural_key(uri: str) -> tuple[Any, ...]:
    name = uri.rsplit("/", 1)[-1]
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _classify(exc: BaseException) -> DecodeError:
    if isinstance(exc, DecodeError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return DecodeError("not_found", str(exc))
    text = f"{type(exc).__name__}: {exc}"
    if "EOF" in text or "truncat" in text.lower() or "moov atom not found" in text:
        return DecodeError("truncated", text)
    return DecodeError("corrupt", text)


def _open(loc: Location):
    return loc.open("rb", block_size=_READ_BLOCK)


def probe_video(loc: Location) -> VideoInfo:
    """Frame count, rate and size of a video; ``DecodeError`` with a reason otherwise."""
    try:
        if loc.uri.lower().rstrip("/").endswith(FRAME_FOLDER_SUFFIX):
            return _probe_folder(loc.with_uri(loc.uri.rstrip("/")))
        return _probe_file(loc)
    except Exception as exc:
        raise _classify(exc) from exc


def _probe_file(loc: Location) -> VideoInfo:
    import av

    uri = loc.uri
    with _open(loc) as f, av.open(f, mode="r") as container:
        if not container.streams.video:
            raise DecodeError("unsupported", "no video stream")
        s = container.streams.video[0]
        codec = s.codec_context.name if s.codec_context else None
        if not codec or not s.codec_context.codec.is_decoder:
            raise DecodeError("unsupported_codec", f"no decoder for codec {codec or 'unknown'}")
        avg, base = s.average_rate, s.base_rate
        if not avg or avg <= 0:
            raise DecodeError("empty", "the video stream has no frame rate (no frames?)")
        fps = float(avg)
        if base and abs(float(base) - fps) > 0.01 * fps:
            raise DecodeError(
                "variable_frame_rate", f"average rate {fps:.3f} != base rate {float(base):.3f}"
            )
        n, exact = int(s.frames or 0), bool(s.frames)
        if not exact:
            duration = (
                float(s.duration * s.time_base) if s.duration else (container.duration or 0) / 1e6
            )
            n = int(round(duration * fps))
        if n <= 0:
            raise DecodeError("empty", "the video has no frames")
        return VideoInfo(uri, n, fps, s.codec_context.width, s.codec_context.height, exact, codec)


def _probe_folder(loc: Location) -> VideoInfo:
    from PIL import Image

    uri, fs, path = loc.uri, loc.fs, loc.path
    if not fs.isdir(path):
        raise FileNotFoundError(f"frame folder {uri} does not exist")
    names = [p for p in fs.ls(path, detail=False) if p.lower().endswith(FRAME_EXTENSIONS)]
    if not names:
        raise DecodeError("empty", f"frame folder {uri} holds no JPEG files")
    frames = sorted((uri + "/" + p.rsplit("/", 1)[-1] for p in names), key=_natural_key)
    with _open(loc.with_uri(frames[0])) as f, Image.open(f) as img:
        width, height = img.size
    return VideoInfo(uri, len(frames), None, width, height, True, "jpeg", tuple(frames))


def decode_frames(
    info: VideoInfo,
    wanted: Sequence[int],
    on_frame: OnFrame,
    loc: Location,
) -> list[int]:
    """Decode the source frames ``wanted`` (sorted) and hand each to ``on_frame``.

    Frames are passed on one at a time (RGB ``uint8``), so the caller can shrink
    them at once and a shard's memory is its model-resolution tensor, not its
    decoded pixels. Returns the indices delivered: fewer than ``wanted`` when
    the video ends early (the caller decides what that means).
    """
    if not wanted:
        return []
    try:
        if info.frame_uris:
            return _decode_folder(info, wanted, on_frame, loc)
        return _decode_file(info, wanted, on_frame, loc)
    except Exception as exc:
        raise _classify(exc) from exc


def _decode_folder(info, wanted, on_frame, loc: Location) -> list[int]:
    done = []
    for idx in wanted:
        if idx >= len(info.frame_uris):
            break
        data = loc.with_uri(info.frame_uris[idx]).read_bytes()
        on_frame(idx, decode_image(data, max_pixels=_MAX_PIXELS), None)
        done.append(idx)
    return done


def _decode_file(info, wanted, on_frame, loc: Location) -> list[int]:
    import av

    todo = set(wanted)
    first, last = wanted[0], wanted[-1]
    done: list[int] = []
    with _open(loc.with_uri(info.uri)) as f, av.open(f, mode="r") as container:
        s = container.streams.video[0]
        s.thread_type = "AUTO"
        tb, start = s.time_base, s.start_time or 0
        if first > 0:  # keyframe at or before the first frame; decode forward from there
            container.seek(start + int(first / info.fps / tb), stream=s, backward=True)
        previous = None
        for frame in container.decode(s):
            if frame.pts is None:
                idx = 0 if previous is None else previous + 1
            else:
                exact = float((frame.pts - start) * tb) * info.fps
                idx = int(round(exact))
                if abs(exact - idx) > _GRID_TOLERANCE:
                    msg = f"frame at {exact:.3f} is off the {info.fps} fps grid"
                    raise DecodeError("variable_frame_rate", msg)
            if previous is None and idx > first:
                raise DecodeError("corrupt", f"seek to frame {first} landed on frame {idx}")
            previous = idx
            if idx > last:
                break
            if idx in todo:
                ts = float((frame.pts - start) * tb) if frame.pts is not None else idx / info.fps
                on_frame(idx, frame.to_ndarray(format="rgb24"), ts)
                done.append(idx)
    return done
