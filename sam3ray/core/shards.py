"""The plain types of planned work: inputs, videos' shapes, shards.

They are values (frozen, picklable, no I/O) that the planner produces, the
stages receive and the writer's video pass reads, so they sit below all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sam3ray.core.ids import input_id


@dataclass(frozen=True)
class InputRef:
    """One input: its URI (as read) and its stable id (sha1 prefix of the URI)."""

    uri: str
    image_id: str

    @classmethod
    def of(cls, uri: str) -> InputRef:
        return cls(uri, input_id(uri))


@dataclass(frozen=True)
class VideoInfo:
    """What planning needs to know about one video (small; travels in shard rows)."""

    uri: str
    n_frames: int
    fps: float | None
    width: int
    height: int
    frames_exact: bool  # False: estimated from the duration (MKV/WebM carry no count)
    codec: str
    frame_uris: tuple[str, ...] = ()  # frame folders only


@dataclass(frozen=True)
class VideoSpan:
    """The frames of its video a video shard decodes and the frames it writes."""

    index: int  # ordinal of the shard within its video
    n_shards: int
    frames: tuple[int, ...]  # source frame numbers decoded by this shard
    owned: tuple[int, int]  # source frames [lo, hi) written by this shard
    info: VideoInfo | None  # None when the video could not be probed
    error_reason: str | None = None  # the probe's failure: the shard is one error row
    error: str | None = None


@dataclass(frozen=True)
class Shard:
    """A fixed group of inputs, the unit of work and commit; its id names its files.

    Image shards are formed once from inputs no shard holds yet and never re-cut
    (their id is a hash of their members); a video shard is one frame range of
    one video (its id names the video and the first frame).
    """

    shard_id: str
    kind: Literal["image", "video"]
    uris: tuple[str, ...]
    image_ids: tuple[str, ...]  # the inputs' ids (a video's id for a video shard)
    span: VideoSpan | None = None  # video shards only

    def __len__(self) -> int:
        return len(self.uris)

    @property
    def refs(self) -> list[InputRef]:
        return [InputRef(u, i) for u, i in zip(self.uris, self.image_ids, strict=True)]


@dataclass(frozen=True)
class ShardTask:
    """What one run does to one shard.

    ``concepts`` are labelled now (all of them when ``fresh``; those added or
    edited since for a labelled shard), ``drop`` are removed, ``prints`` are the
    shard's per-concept fingerprints once this task commits (every concept it will
    hold), and ``previous_files`` are files an earlier attempt may have left.
    ``first``: the shard was never committed (its inputs enter the done-set now).
    """

    shard: Shard
    concepts: tuple[str, ...]
    prints: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    fresh: bool = True
    previous_files: tuple[str, ...] = ()
    first: bool = True

    @property
    def shard_id(self) -> str:
        return self.shard.shard_id

    @property
    def kept(self) -> tuple[str, ...]:
        """Concepts the shard holds already and keeps as they are."""
        now = set(self.concepts)
        return tuple(c for c, _ in self.prints if c not in now)
