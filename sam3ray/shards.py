"""Group inputs into shards, the unit of work, commit and resume.

Why content-defined chunking: a shard's identity and membership must survive
edits to the input list.  With fixed-size chunks, inserting one image near the
start would shift every later boundary and force a full re-run on resume.  Here
a boundary is a property of the input itself (its image_id hash), so adding or
removing one input only changes the shard it falls in (a boundary input splits
or merges two neighbours).  The ``2 * target`` hard cap bounds memory and task
time when a long run of inputs has no boundary; inside such an over-long run an
insertion can shift the cap cuts, but never beyond the next content boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from sam3ray.types import stable_id

logger = logging.getLogger(__name__)


class _RefLike(Protocol):
    uri: str
    image_id: str


class _MarkerLike(Protocol):
    members_hash: str
    settings_hash: str
    n_error: int


class _ShardLike(Protocol):
    shard_id: str
    members_hash: str
    settings_hash: str


_S = TypeVar("_S", bound=_ShardLike)


@dataclass(frozen=True)
class Shard:
    """A deterministic group of inputs; its id names every file it writes."""

    shard_id: str
    uris: tuple[str, ...]
    image_ids: tuple[str, ...]
    members_hash: str
    settings_hash: str = ""  # fingerprint of the labelling settings (set by the planner)

    def __len__(self) -> int:
        return len(self.uris)


def members_hash(image_ids: Iterable[str]) -> str:
    """Hash of a shard's membership: a marker is valid only for these exact inputs."""
    return stable_id("\n".join(sorted(image_ids)))


def shard_id_for(first_uri: str) -> str:
    """Shard id from its first member's URI, so it is stable across runs."""
    return "s" + stable_id(first_uri)


def _make(members: list[_RefLike]) -> Shard:
    ids = tuple(r.image_id for r in members)
    return Shard(
        shard_id=shard_id_for(members[0].uri),
        uris=tuple(r.uri for r in members),
        image_ids=ids,
        members_hash=members_hash(ids),
    )


def _starts_shard(image_id: str, target: int) -> bool:
    try:
        return int(image_id[:8], 16) % target == 0
    except ValueError as exc:
        raise ValueError(f"image_id {image_id!r} is not a hex id (see types.stable_id)") from exc


def make_shards(refs: Sequence[_RefLike], target: int) -> list[Shard]:
    """Cut URI-sorted inputs into shards of about ``target`` members (at most ``2 * target``).

    Sorting happens here too, because shard ids and boundaries are only
    deterministic over a canonical order.  Duplicate URIs are dropped (with a
    warning): one input must appear exactly once in the images table.
    """
    if target < 1:
        raise ValueError(f"shard target must be >= 1, got {target}")
    ordered: list[_RefLike] = []
    seen: set[str] = set()
    for ref in sorted(refs, key=lambda r: r.uri):
        if ref.uri in seen:
            logger.warning("duplicate input %s dropped from sharding", ref.uri)
            continue
        seen.add(ref.uri)
        ordered.append(ref)

    shards: list[Shard] = []
    current: list[_RefLike] = []
    cap = 2 * target
    for ref in ordered:
        boundary = _starts_shard(ref.image_id, target)  # validates every image_id
        if current and (boundary or len(current) >= cap):
            shards.append(_make(current))
            current = []
        current.append(ref)
    if current:
        shards.append(_make(current))
    return shards


def is_done(
    shard: _ShardLike,
    done_markers: Mapping[str, _MarkerLike],
    retry_errors: bool = False,
) -> bool:
    """The resume rule for any shard (images or video frames): its marker exists for
    this exact membership and these labelling settings, and (with ``retry_errors``)
    it recorded no error."""
    marker = done_markers.get(shard.shard_id)
    if marker is None or marker.members_hash != shard.members_hash:
        return False
    if marker.settings_hash != shard.settings_hash:
        return False
    return not (retry_errors and marker.n_error > 0)


def settings_changed(shards: Iterable[_S], done_markers: Mapping[str, _MarkerLike]) -> list[_S]:
    """Shards whose marker matches their membership but not their labelling settings:
    the ones a resume relabels only because the concepts, model or thresholds changed."""
    out = []
    for shard in shards:
        marker = done_markers.get(shard.shard_id)
        if (
            marker is not None
            and marker.members_hash == shard.members_hash
            and marker.settings_hash != shard.settings_hash
        ):
            out.append(shard)
    return out


def split_done(
    shards: Iterable[_S],
    done_markers: Mapping[str, _MarkerLike],
    retry_errors: bool = False,
    fingerprint: Callable[[_S], str] | None = None,
) -> tuple[list[_S], list[_S]]:
    """(todo, skipped): stamp each shard with its settings ``fingerprint`` (when
    given), then apply :func:`is_done`. Shared by image and video planning."""
    todo: list[_S] = []
    skipped: list[_S] = []
    for shard in shards:
        if fingerprint is not None:
            shard = replace(shard, settings_hash=fingerprint(shard))  # type: ignore[type-var]
        (skipped if is_done(shard, done_markers, retry_errors) else todo).append(shard)
    return todo, skipped


def plan_shards(
    refs: Sequence[_RefLike],
    target: int,
    done_markers: Mapping[str, _MarkerLike],
    retry_errors: bool = False,
    fingerprint: Callable[[Shard], str] | None = None,
) -> tuple[list[Shard], list[Shard]]:
    """Split the shards into (todo, skipped) given the commit markers found on resume.

    A shard is skipped only if its marker was written for the same membership
    and settings: if an input joined or left, or the concepts, checkpoint or
    thresholds changed (``fingerprint``), the shard's files are stale and it is
    redone. With ``retry_errors`` a shard whose marker recorded errors is redone too.
    """
    todo, skipped = split_done(make_shards(refs, target), done_markers, retry_errors, fingerprint)
    logger.info("shard plan: %d to do, %d already done", len(todo), len(skipped))
    return todo, skipped


def orphaned_shard_ids(shards: Iterable[Shard], done_markers: Mapping[str, object]) -> list[str]:
    """Marker ids that no current shard owns.

    They appear when an input that started a shard is removed (its members join
    the previous shard, under that shard's id): the old shard's rows would then
    be duplicated by the new one.  They also appear when a run covers only a
    subset of an earlier run's inputs, so they are never deleted blindly:
    ``orphans.reconcile_orphans`` trims them to the inputs no current shard owns.
    """
    current = {s.shard_id for s in shards}
    return sorted(sid for sid in done_markers if sid not in current)
