"""Shards, the unit of work, commit and resume: one type for images and videos.

An image shard is a group of images; a video shard is a frame range of one
video (``span``). Both are committed by one marker and skipped on resume by
one rule (:func:`is_done`).

Image shards are cut by content-defined chunking: a shard's identity and
membership must survive edits to the input list. With fixed-size chunks,
inserting one image near the start would shift every later boundary and
force a full re-run on resume. Here a boundary is a property of the input
itself (its id hash), so adding or removing one input only changes the shard
it falls in (a boundary input splits or merges two neighbours). The
``2 * target`` hard cap bounds memory and task time when a long run of inputs
has no boundary; inside such an over-long run an insertion can shift the cap
cuts, but never beyond the next content boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from sam3ray.core.ids import image_shard_id, members_hash
from sam3ray.core.shards import InputRef, Shard

if TYPE_CHECKING:
    from sam3ray.output.markers import Marker

logger = logging.getLogger(__name__)


def _make(members: list[InputRef]) -> Shard:
    ids = tuple(r.image_id for r in members)
    return Shard(
        shard_id=image_shard_id(members[0].uri),
        kind="image",
        uris=tuple(r.uri for r in members),
        image_ids=ids,
        members_hash=members_hash(ids),
    )


def _starts_shard(image_id: str, target: int) -> bool:
    try:
        return int(image_id[:8], 16) % target == 0
    except ValueError as exc:
        raise ValueError(f"image_id {image_id!r} is not a hex id (see core.ids.stable_id)") from exc


def make_shards(refs: Sequence[InputRef], target: int) -> list[Shard]:
    """Cut URI-sorted inputs into shards of about ``target`` members (at most ``2 * target``).

    Sorting happens here too, because shard ids and boundaries are only
    deterministic over a canonical order. Duplicate URIs are dropped (with a
    warning): one input must appear exactly once in the images table.
    """
    if target < 1:
        raise ValueError(f"shard target must be >= 1, got {target}")
    ordered: list[InputRef] = []
    seen: set[str] = set()
    for ref in sorted(refs, key=lambda r: r.uri):
        if ref.uri in seen:
            logger.warning("duplicate input %s dropped from sharding", ref.uri)
            continue
        seen.add(ref.uri)
        ordered.append(ref)

    shards: list[Shard] = []
    current: list[InputRef] = []
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


def is_done(shard: Shard, markers: Mapping[str, Marker], retry_errors: bool = False) -> bool:
    """The resume rule for any shard: its marker exists for this exact membership and
    these labelling settings, and (with ``retry_errors``) it recorded no error."""
    marker = markers.get(shard.shard_id)
    if marker is None or marker.members_hash != shard.members_hash:
        return False
    if marker.settings_hash != shard.settings_hash:
        return False
    return not (retry_errors and marker.n_error > 0)


def settings_changed(shards: Iterable[Shard], markers: Mapping[str, Marker]) -> list[Shard]:
    """Shards whose marker matches their membership but not their labelling settings:
    the ones a resume relabels only because the concepts, model or thresholds changed."""
    out = []
    for shard in shards:
        marker = markers.get(shard.shard_id)
        if (
            marker is not None
            and marker.members_hash == shard.members_hash
            and marker.settings_hash != shard.settings_hash
        ):
            out.append(shard)
    return out


def split_done(
    shards: Iterable[Shard],
    markers: Mapping[str, Marker],
    retry_errors: bool = False,
    fingerprint: Callable[[Shard], str] | None = None,
) -> tuple[list[Shard], list[Shard]]:
    """(todo, skipped): stamp each shard with its settings ``fingerprint`` (when given),
    then apply :func:`is_done`."""
    todo: list[Shard] = []
    skipped: list[Shard] = []
    for shard in shards:
        if fingerprint is not None:
            shard = replace(shard, settings_hash=fingerprint(shard))
        (skipped if is_done(shard, markers, retry_errors) else todo).append(shard)
    return todo, skipped


def orphaned_shard_ids(shards: Iterable[Shard], markers: Mapping[str, object]) -> list[str]:
    """Marker ids that no current shard owns.

    They appear when an input that started a shard is removed (its members join
    the previous shard, under that shard's id): the old shard's rows would then
    be duplicated by the new one. They also appear when a run covers only a
    subset of an earlier run's inputs, so they are never deleted blindly:
    ``output.reconcile`` trims them to the inputs no current shard owns.
    """
    current = {s.shard_id for s in shards}
    return sorted(sid for sid in markers if sid not in current)
