"""Append-only shards: what each hash bucket of the lake needs done. Pure functions.

Planning runs per bucket (a hash of the image id, ``output.state.bucket_of``), so
the same code serves a laptop (in-process) and a cluster (one Ray task per
bucket), and no process ever needs the whole input list:

- :func:`new_image_tasks`: inputs the output does not hold yet (the listing
  minus the done-set, per bucket), cut into new shards named from their members.
  A committed shard is never re-cut: a nightly run over a grown lake labels only
  its new inputs, in new shards, whatever their names.
- :func:`stale_tasks`: the bucket's committed shards whose per-concept
  fingerprints differ from the job's: label the added or edited concepts, drop
  the removed ones, leave the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from sam3ray.core.ids import stable_id
from sam3ray.core.shards import InputRef, Shard, ShardTask
from sam3ray.output.state import possible_files
from sam3ray.plan.fingerprint import ConceptPrints


def image_shard_id(image_ids: Iterable[str]) -> str:
    """A shard's id, from its members: the same members always give the same files."""
    return "s" + stable_id("\n".join(sorted(image_ids)))


def unique_sorted(refs: Iterable[InputRef]) -> list[InputRef]:
    """Inputs by URI, each once (one input is listed twice by overlapping globs)."""
    seen: set[str] = set()
    out = []
    for ref in sorted(refs, key=lambda r: r.uri):
        if ref.image_id not in seen:
            seen.add(ref.image_id)
            out.append(ref)
    return out


def cut(refs: list[InputRef], target: int) -> list[list[InputRef]]:
    """``refs`` in ``ceil(n / target)`` runs of near-equal size (none above ``target``)."""
    if target < 1:
        raise ValueError(f"shard target must be >= 1, got {target}")
    if not refs:
        return []
    n_shards = math.ceil(len(refs) / target)
    size, longer = divmod(len(refs), n_shards)  # the first ``longer`` runs take one more
    bounds = [k * size + min(k, longer) for k in range(n_shards + 1)]
    return [refs[a:b] for a, b in zip(bounds, bounds[1:])]


def fresh_task(shard: Shard, prints: ConceptPrints) -> ShardTask:
    """The task that labels a shard for the first time, with every concept."""
    target = prints.for_shard(shard)
    return ShardTask(
        shard=shard,
        concepts=tuple(sorted(target)),
        prints=tuple(sorted(target.items())),
        fresh=True,
        previous_files=tuple(possible_files(shard.shard_id, target)),
    )


def new_image_tasks(
    refs: Iterable[InputRef], target: int, prints: ConceptPrints
) -> list[ShardTask]:
    """New inputs (none of them held by any shard) cut into new shards of ~``target``."""
    tasks = []
    for members in cut(unique_sorted(refs), target):
        ids = tuple(r.image_id for r in members)
        shard = Shard(image_shard_id(ids), "image", tuple(r.uri for r in members), ids)
        tasks.append(fresh_task(shard, prints))
    return tasks


def stale_task(shard: Shard, current: Mapping[str, str], prints: ConceptPrints) -> ShardTask | None:
    """What a committed shard needs now, or None when its labels are current.

    A concept is labelled when it is new to the shard or its fingerprint changed;
    a concept the job no longer has is dropped; the others are kept as they are.
    """
    target = prints.for_shard(shard)
    run = tuple(sorted(c for c, fp in target.items() if current.get(c) != fp))
    drop = tuple(sorted(c for c in current if c not in target))
    if not run and not drop:
        return None
    return ShardTask(
        shard=shard,
        concepts=run,
        prints=tuple(sorted(target.items())),
        drop=drop,
        fresh=False,
        previous_files=tuple(possible_files(shard.shard_id, [*run, *drop])),
        first=False,
    )
