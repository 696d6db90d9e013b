"""Orphaned shards: committed shards that no shard of the current plan owns.

Why they need work: a shard's id comes from its first member's URI and its
boundaries from ``output.shard_size``. Removing a shard's first input, or
changing ``shard_size``, moves its other members into shards with other ids,
so after the new shards commit, those inputs would be labelled twice. An
orphan is also what a run over a *different* set of inputs into the same
output leaves behind, and those labels must stay.

So, after a run's shards are committed, each orphan is trimmed to the members
that no current input claims, and deleted when none is left. The output then
holds every input ever labelled exactly once, labelled by the latest run that
listed it. Trimming rewrites the shard through ``ShardWriter`` (files first,
marker last), so a crash in the middle leaves an orphan the next run trims
again, never a half-written shard.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from sam3ray.core.ids import members_hash
from sam3ray.output.layout import images_path, owned_class_id
from sam3ray.output.markers import Marker
from sam3ray.output.parquet import read_table
from sam3ray.output.schema import DETECTIONS_SCHEMA, empty_detections, validate_table
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.storage.location import Location
from sam3ray.storage.retry import retry_transient

logger = logging.getLogger(__name__)

_THREADS = 16  # object-store round trips dominate: overlap them


def trim_orphan(writer: ShardWriter, marker: Marker, current_ids: set[str]) -> str:
    """Drop the rows of inputs that a current shard owns; "kept", "trimmed" or "deleted"."""
    output = writer.output
    try:
        images = read_table(output.child(images_path(marker.shard_id)))
    except FileNotFoundError:  # only delete_shard removes it: finish that delete
        logger.warning("orphan %s has no images file: deleting it", marker.shard_id)
        writer.delete_shard(marker)
        return "deleted"
    ids = set(images.column("image_id").to_pylist())
    claimed = ids & current_ids
    if not claimed:
        return "kept"
    if claimed == ids:
        writer.delete_shard(marker)
        return "deleted"
    keep = pa.array(sorted(ids - claimed))
    parts = [empty_detections()]
    for relpath in marker.files:
        class_id = owned_class_id(relpath, marker.shard_id)
        if class_id is None:
            continue
        try:  # a trim that died after dropping a stale class file leaves it listed
            part = read_table(output.child(relpath))
        except FileNotFoundError:
            continue
        part = part.filter(pc.is_in(part.column("image_id"), value_set=keep))
        part = part.append_column("class_id", pa.array([class_id] * part.num_rows))
        parts.append(validate_table(part, DETECTIONS_SCHEMA, what=relpath))
    kept_images = images.filter(pc.is_in(images.column("image_id"), value_set=keep))
    writer.write(
        ShardOutput.rewrite(
            marker, pa.concat_tables(parts), kept_images, members_hash(keep.to_pylist())
        )
    )
    return "trimmed"


def reconcile_orphans(
    output: Location, orphans: Mapping[str, Marker], current_ids: Collection[str]
) -> dict[str, int]:
    """Trim or delete every orphan whose inputs a current shard owns; counts by outcome
    ("kept", "trimmed", "deleted", "failed").

    Call only after the current run's shards are committed: until then the
    orphan's rows are the only labels of those inputs.
    """
    if not orphans:
        return {}
    writer = ShardWriter(output)
    current = set(current_ids)

    def one(marker: Marker) -> str:
        try:  # idempotent: a retry re-reads what the last attempt left
            return retry_transient(
                lambda: trim_orphan(writer, marker, current), f"trimming orphan {marker.shard_id}"
            )
        except Exception:  # the run's labels are committed; the next run tries again
            logger.exception("orphan %s not reconciled (duplicates remain)", marker.shard_id)
            return "failed"

    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(orphans)))) as pool:
        outcomes = Counter(pool.map(one, orphans.values()))
    logger.info("orphaned shards in %s: %s", output.uri, dict(outcomes))
    return dict(outcomes)
