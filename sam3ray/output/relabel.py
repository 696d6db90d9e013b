"""Relabelling some concepts of a committed shard without touching the others.

A new concept (or an edited one) is labelled over shards that hold other
concepts already: their files stay as they are, and the shard's ``images`` rows
are rewritten so that ``n_detections`` still counts every concept it holds.

An input that was labelled before but cannot be read now (deleted from the lake)
keeps its row and its labels: a relabel never costs an input what it had. An
input that ended in error stays in error (``output.retry_errors`` redoes those).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from sam3ray.output.layout import detections_path, images_path, staging_path
from sam3ray.output.parquet import read_table
from sam3ray.output.schema import (
    DETECTIONS_SCHEMA,
    IMAGES_SCHEMA,
    empty_detections,
    validate_table,
)
from sam3ray.storage.location import Location


def current_images(output: Location, shard_id: str) -> pa.Table:
    """The shard's committed ``images`` rows."""
    return read_table(output.child(images_path(shard_id)))


def kept_counts(
    output: Location, shard_id: str, class_ids: Iterable[str]
) -> tuple[Counter, list[str]]:
    """Detections per input in the kept concepts' files, and which of those files exist."""
    counts: Counter = Counter()
    present = []
    for class_id in class_ids:
        relpath = detections_path(class_id, shard_id)
        try:
            table = read_table(output.child(relpath), columns=["image_id"])
        except FileNotFoundError:
            continue
        counts.update(table.column("image_id").to_pylist())
        present.append(relpath)
    return counts, present


def accepted_inputs(old: pa.Table, new: pa.Table | None) -> set[str]:
    """Inputs whose new labels count: ok before and ok now."""
    if new is None:
        return set()
    was_ok = {
        r["image_id"] for r in old.select(["image_id", "status"]).to_pylist() if r["status"] == "ok"
    }
    now_ok = {
        r["image_id"] for r in new.select(["image_id", "status"]).to_pylist() if r["status"] == "ok"
    }
    return was_ok & now_ok


def merge_images(old: pa.Table, new: pa.Table | None, counts: Counter, run_id: str) -> pa.Table:
    """The shard's images rows after a relabel.

    An input takes its new row when it was ok before and is ok now
    (:func:`accepted_inputs`); otherwise it keeps its old row. ``counts``
    (detections per input over every concept the shard holds after the commit)
    set ``n_detections``; every row carries ``run_id`` (the run that wrote the file).
    """
    accepted = accepted_inputs(old, new)
    fresh = {r["image_id"]: r for r in (new.to_pylist() if new is not None else [])}
    rows = []
    for row in old.to_pylist():
        row = dict(fresh[row["image_id"]] if row["image_id"] in accepted else row)
        row["run_id"] = run_id
        row["n_detections"] = counts.get(row["image_id"], 0) if row["status"] == "ok" else 0
        rows.append(row)
    return validate_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), IMAGES_SCHEMA)


def carried_over(
    output: Location, shard_id: str, class_ids: Iterable[str], image_ids: set[str]
) -> pa.Table:
    """The old detections of these concepts for inputs a relabel could not reach (they
    keep them), as a detections table."""
    parts = [empty_detections()]
    if image_ids:
        for class_id in class_ids:
            try:
                part = read_table(output.child(detections_path(class_id, shard_id)))
            except FileNotFoundError:
                continue
            part = only(part, image_ids)
            part = part.append_column("class_id", pa.array([class_id] * part.num_rows, pa.string()))
            parts.append(validate_table(part, DETECTIONS_SCHEMA))
    return pa.concat_tables(parts)


def only(table: pa.Table, image_ids: set[str]) -> pa.Table:
    """Rows of ``table`` for these inputs."""
    keep = pa.array(sorted(image_ids), pa.string())
    return table.filter(pc.is_in(table.column("image_id"), value_set=keep))


def merge_staging(
    output: Location, shard_id: str, new: pa.Table, replaced: Iterable[str]
) -> pa.Table:
    """A video shard's staging after relabelling: the other concepts' tracks as they
    were, the new tracks numbered after them (local ids stay unique in the shard)."""
    replaced = set(replaced)
    try:
        old = read_table(output.child(staging_path(shard_id)))
    except FileNotFoundError:
        return new
    keep = old.filter(pc.invert(pc.is_in(old.column("class_id"), pa.array(sorted(replaced)))))
    if keep.num_rows == 0:
        return new
    offset = pc.max(keep.column("track_id")).as_py() + 1
    shifted = pc.add(new.column("track_id").cast(pa.int64()), offset)
    index = new.schema.get_field_index("track_id")
    new = new.set_column(
        index, new.schema.field("track_id"), shifted.cast(new.schema.field("track_id").type)
    )
    return pa.concat_tables([keep, new.cast(keep.schema)])
