"""Cut videos into shards: probe every video, then frame ranges that overlap.

Frames are counted in *sampled* frames (every ``frame_stride``-th source
frame). Shard ``k`` covers sampled frames ``[k*step, k*step + shard_frames)``
with ``step = shard_frames - overlap_frames``; a new shard starts only while
the previous one does not reach the end. Shard ``k`` *owns* sampled frames
``[k*step, (k+1)*step)`` (the last shard owns up to its end): the owned frames
of all shards partition the video, so every sampled frame is written exactly
once; the overlap frames serve only to join tracks (``output.stitch``).

Shard ids name the video and the first source frame, so a redone shard
rewrites its own files. A video that cannot be probed becomes one error shard
(start 0) that yields an error row and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from sam3ray.config.schema import InputConfig, VideoConfig
from sam3ray.core.errors import DecodeError
from sam3ray.core.ids import video_shard_id
from sam3ray.core.shards import InputRef, Shard, VideoInfo, VideoSpan
from sam3ray.sources.video import probe_video

logger = logging.getLogger(__name__)

_PROBE_THREADS = 16  # probing is I/O (headers, indexes): overlap the round trips


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


def _video_shard(ref: InputRef, first: int, span: VideoSpan) -> Shard:
    return Shard(
        shard_id=video_shard_id(ref.image_id, first),
        kind="video",
        uris=(ref.uri,),
        image_ids=(ref.image_id,),
        span=span,
    )


def video_shards(ref: InputRef, info: VideoInfo, video: VideoConfig) -> list[Shard]:
    """The shards of one probed video."""
    stride = video.frame_stride
    n_sampled = -(-info.n_frames // stride)
    ranges = sampled_ranges(n_sampled, video.shard_frames, video.overlap_frames)
    shards = []
    for k, (s, stop, owned_stop) in enumerate(ranges):
        frames = tuple(range(s * stride, stop * stride, stride))
        owned = (s * stride, owned_stop * stride if k + 1 < len(ranges) else info.n_frames)
        span = VideoSpan(k, len(ranges), frames, owned, info)
        shards.append(_video_shard(ref, frames[0], span))
    return shards


def error_shard(ref: InputRef, exc: DecodeError) -> Shard:
    """The single shard standing for a video that cannot be probed."""
    span = VideoSpan(0, 1, (), (0, 0), None, exc.reason, f"{exc}"[:500])
    return _video_shard(ref, 0, span)


def probe_all(refs: Sequence[InputRef], source: InputConfig) -> dict[str, VideoInfo | DecodeError]:
    """Probe videos in parallel threads; failures are returned, not raised."""

    def one(ref: InputRef) -> VideoInfo | DecodeError:
        try:
            return probe_video(source.location(ref.uri))
        except DecodeError as exc:
            logger.warning("video %s cannot be used: %s", ref.uri, exc)
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(_PROBE_THREADS, len(refs)))) as pool:
        return dict(zip((r.uri for r in refs), pool.map(one, refs)))


def cut_videos(refs: Sequence[InputRef], source: InputConfig, video: VideoConfig) -> list[Shard]:
    """Every shard of every video, in URI then frame order."""
    probes = probe_all(refs, source)
    shards: list[Shard] = []
    for ref in sorted(refs, key=lambda r: r.uri):
        info = probes[ref.uri]
        if isinstance(info, DecodeError):
            shards.append(error_shard(ref, info))
        else:
            shards += video_shards(ref, info, video)
    return shards
