"""Plan video work on the driver: probe every video, cut it into shards.

Frames are counted in *sampled* frames (every ``frame_stride``-th source
frame). Shard ``k`` covers sampled frames ``[k*step, k*step + shard_frames)``
with ``step = shard_frames - overlap_frames``; a new shard starts only while
the previous one does not reach the end. Shard ``k`` *owns* sampled frames
``[k*step, (k+1)*step)`` (the last shard owns up to its end): the owned frames
of all shards partition the video, so every sampled frame is written exactly
once; the overlap frames serve only to join tracks (video_stitch.py).

Shard ids are ``"v" + stable_id(uri) + f"-{first source frame:07d}"`` and the
membership hash covers the frame range, so resume, retries and overwrites use
the image job's marker machinery unchanged. A video that cannot be probed
becomes one error shard (start 0) that yields an error row and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from sam3ray.decode import DecodeError
from sam3ray.inputs import InputRef
from sam3ray.shards import split_done
from sam3ray.types import stable_id
from sam3ray.video_decode import VideoInfo, probe_video

logger = logging.getLogger(__name__)

_PROBE_THREADS = 16  # probing is I/O (headers, indexes): overlap the round trips


@dataclass(frozen=True)
class VideoShard:
    """One unit of video work (what an actor receives, as ``to_row()``)."""

    shard_id: str
    members_hash: str
    video_id: str
    uri: str
    index: int  # ordinal of the shard within its video
    n_shards: int
    frames: tuple[int, ...]  # source frame numbers decoded by this shard
    owned: tuple[int, int]  # source frames [lo, hi) written by this shard
    info: VideoInfo | None
    error_reason: str | None = None
    error: str | None = None
    settings_hash: str = ""  # fingerprint of the labelling settings (set by the planner)

    def to_row(self, previous_files: Sequence[str] = ()) -> dict[str, Any]:
        row = asdict(self)
        row["frames"] = list(self.frames)
        row["owned"] = list(self.owned)
        row["info"] = None if self.info is None else {**asdict(self.info)}
        if row["info"] is not None:
            row["info"]["frame_uris"] = list(self.info.frame_uris)
        row["previous_files"] = list(previous_files)
        return row


def info_from_row(d: Mapping[str, Any] | None) -> VideoInfo | None:
    if d is None:
        return None
    return VideoInfo(**{**d, "frame_uris": tuple(d.get("frame_uris") or ())})


def shard_id_for(video_id: str, first_frame: int) -> str:
    return f"v{video_id}-{first_frame:07d}"


def sampled_ranges(n_sampled: int, shard_frames: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, stop, owned_stop) in sampled frames for every shard of a video."""
    if n_sampled <= 0:
        return []
    step = shard_frames - overlap
    starts = [0]
    while starts[-1] + shard_frames < n_sampled:
        starts.append(starts[-1] + step)
    out = []
    for k, s in enumerate(starts):
        stop = min(s + shard_frames, n_sampled)
        owned_stop = starts[k + 1] if k + 1 < len(starts) else stop
        out.append((s, stop, owned_stop))
    return out


def video_shards(
    ref: InputRef, info: VideoInfo, shard_frames: int, overlap: int, stride: int
) -> list[VideoShard]:
    """The shards of one probed video."""
    n_sampled = -(-info.n_frames // stride)
    ranges = sampled_ranges(n_sampled, shard_frames, overlap)
    shards = []
    for k, (s, stop, owned_stop) in enumerate(ranges):
        frames = tuple(range(s * stride, stop * stride, stride))
        owned = (s * stride, owned_stop * stride if k + 1 < len(ranges) else info.n_frames)
        key = f"{ref.uri}|{frames[0]}|{frames[-1]}|{stride}|{owned[0]}|{owned[1]}"
        shards.append(VideoShard(
            shard_id_for(ref.image_id, frames[0]), stable_id(key), ref.image_id, ref.uri,
            k, len(ranges), frames, owned, info,
        ))  # fmt: skip
    return shards


def error_shard(ref: InputRef, exc: DecodeError) -> VideoShard:
    """The single shard standing for a video that cannot be probed."""
    key = f"{ref.uri}|error|{exc.reason}"
    return VideoShard(
        shard_id_for(ref.image_id, 0), stable_id(key), ref.image_id, ref.uri, 0, 1, (), (0, 0),
        None, exc.reason, f"{exc}"[:500],
    )  # fmt: skip


def probe_all(
    refs: Sequence[InputRef], storage_options: Mapping[str, Any] | None
) -> dict[str, VideoInfo | DecodeError]:
    """Probe videos in parallel threads; failures are returned, not raised."""

    def one(ref: InputRef) -> VideoInfo | DecodeError:
        try:
            return probe_video(ref.uri, storage_options)
        except DecodeError as exc:
            logger.warning("video %s cannot be used: %s", ref.uri, exc)
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(_PROBE_THREADS, len(refs)))) as pool:
        return dict(zip((r.uri for r in refs), pool.map(one, refs)))


def plan_video_shards(
    refs: Sequence[InputRef],
    video_cfg: Any,
    done_markers: Mapping[str, Any],
    retry_errors: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    fingerprint: Callable[[VideoShard], str] | None = None,
) -> tuple[list[VideoShard], list[VideoShard]]:
    """(todo, skipped) over all videos, as ``shards.plan_shards`` does for images.

    ``video_cfg`` is ``config.VideoConfig``. A shard is skipped when its marker
    matches its membership and settings ``fingerprint`` (and, with
    ``retry_errors``, recorded no error).
    """
    probes = probe_all(refs, storage_options)
    shards: list[VideoShard] = []
    for ref in sorted(refs, key=lambda r: r.uri):
        info = probes[ref.uri]
        if isinstance(info, DecodeError):
            shards.append(error_shard(ref, info))
        else:
            shards += video_shards(
                ref, info, video_cfg.shard_frames, video_cfg.overlap_frames, video_cfg.frame_stride
            )
    todo, skipped = split_done(shards, done_markers, retry_errors, fingerprint)
    logger.info("video plan: %d shards to do, %d already done", len(todo), len(skipped))
    return todo, skipped
