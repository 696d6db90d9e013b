"""The planning engine for lakes: the bucket work of ``plan.buckets`` in Ray Data.

    listing parts ──flat_map──► (uri, image_id, bucket) ──groupby(bucket)──► new shards
    shards-table buckets ──map──► stale shards                                   │
                                          └───────────── union ──► _state/plans/<run_id>/

The listing runs in parallel tasks (one per part: a sub-prefix, a manifest file,
an inventory data file); the one shuffle groups the listed inputs by hash
bucket, and each bucket's task reads that bucket's done-set and cuts its new
inputs into shards. Consolidation after the run groups the plan by shard bucket
(one listing of commit keys per bucket) and the new index rows by image bucket.
The driver holds counts only.
"""

from __future__ import annotations

import json
import logging
import pickle
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from sam3ray.config.schema import JobConfig
from sam3ray.core.ids import input_id, stable_id
from sam3ray.core.shards import InputRef
from sam3ray.output.schema import utc_now
from sam3ray.output.state import (
    INDEX_DIR,
    INDEX_SCHEMA,
    SHARDS_DIR,
    TASK_SCHEMA,
    Held,
    bucket_of,
    held_inputs,
    plan_files,
    read_plan_file,
    state_buckets,
    write_bucket,
    write_plan_file,
    write_run_record,
)
from sam3ray.plan.buckets import (
    PlanStats,
    consolidate_bucket,
    count_fresh,
    new_work,
    remove_leftovers,
    stale_work,
    tasks_table,
)
from sam3ray.plan.job import Prepared
from sam3ray.plan.shards import new_image_tasks
from sam3ray.sources.listing import listing_parts, nothing_listed, read_part
from sam3ray.sources.video import frame_folder_of
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

#: A plan file's rows are tasks, plus one "stats" row per bucket (shard_id empty).
_STATS = "stats"
PLAN_SCHEMA = TASK_SCHEMA.append(pa.field("stats", pa.string()))


def _with_stats(tasks: pa.Table, stats: PlanStats) -> pa.Table:
    tasks = tasks.append_column("stats", pa.nulls(tasks.num_rows, pa.string()))
    row = {name: None for name in PLAN_SCHEMA.names} | {
        "shard_id": "",
        "kind": _STATS,
        "stats": json.dumps(_stats_json(stats)),
    }
    return pa.concat_tables([tasks, pa.Table.from_pylist([row], schema=PLAN_SCHEMA)])


def _stats_json(stats: PlanStats) -> dict[str, Any]:
    d = stats.__dict__.copy()
    d["changed_by"] = sorted(d["changed_by"])
    return d


def _stats_from(text: str) -> PlanStats:
    d = json.loads(text)
    d["changed_by"] = set(d["changed_by"])
    return PlanStats(**d)


_LISTED = pa.schema([("uri", pa.string()), ("image_id", pa.string()), ("bucket", pa.int32())])


def _list_parts(batch: pa.Table, cfg: JobConfig) -> pa.Table:
    """The inputs of some listing parts, with their ids and buckets (a frame of a
    ``*.frames/`` folder stands for its folder, the video)."""
    uris = []
    for blob in batch.column("part").to_pylist():
        for uri in read_part(cfg.input, pickle.loads(blob)):
            uris.append(frame_folder_of(uri) or uri)
    ids = [input_id(u) for u in uris]
    buckets = [bucket_of(i) for i in ids]
    return pa.Table.from_arrays(
        [pa.array(uris, pa.string()), pa.array(ids, pa.string()), pa.array(buckets, pa.int32())],
        schema=_LISTED,
    )


#: What a bucket's task returns: its new images (``row`` = "ref"), its new videos' tasks
#: ("task") and its counts ("stats").
_BUCKET_SCHEMA = (
    PLAN_SCHEMA.append(pa.field("row", pa.string()))
    .append(pa.field("uri", pa.string()))
    .append(pa.field("image_id", pa.string()))
)


def _new_in_bucket(group: pa.Table, cfg: JobConfig, prepared: Prepared) -> pa.Table:
    """One bucket's listed inputs minus its done-set (vectorised: a nightly run over a
    labelled lake handles millions of done inputs per bucket)."""
    bucket = group.column("bucket")[0].as_py()
    unique = group.group_by("image_id", use_threads=False).aggregate([("uri", "min")])
    listed = unique.num_rows
    held = Held()
    if cfg.output.mode != "overwrite":
        held = held_inputs(cfg.output_location, bucket)
        if held.done:
            done = pc.is_in(unique.column("image_id"), value_set=pa.array(sorted(held.done)))
            unique = unique.filter(pc.invert(done))
            held = Held(video_shards=held.video_shards)  # filtered out above
    refs = [
        InputRef(u, i)
        for u, i in zip(unique.column("uri_min").to_pylist(), unique.column("image_id").to_pylist())
    ]
    images, videos, stats = new_work(bucket, refs, cfg.input, cfg.video, prepared.prints, held)
    stats.listed = listed
    tasks = _with_stats(tasks_table(videos), stats).to_pylist()
    rows = [r | {"row": "stats" if r["kind"] == _STATS else "task"} for r in tasks]
    rows += [{"row": "ref", "uri": r.uri, "image_id": r.image_id} for r in images]
    return pa.Table.from_pylist(rows, schema=_BUCKET_SCHEMA)


def _cut_batch(batch: pa.Table, cfg: JobConfig, prepared: Prepared) -> pa.Table:
    """One batch of new images (any buckets) as new shards, with their counts."""
    uris, ids = batch.column("uri").to_pylist(), batch.column("image_id").to_pylist()
    refs = [InputRef(u, i) for u, i in zip(uris, ids, strict=True)]
    tasks = new_image_tasks(refs, cfg.output.shard_size, prepared.prints)
    stats = PlanStats()
    count_fresh(stats, tasks)
    return _with_stats(tasks_table(tasks), stats)


def _stale_in_buckets(batch: pa.Table, cfg: JobConfig, prepared: Prepared) -> pa.Table:
    out = []
    for bucket in batch.column("bucket").to_pylist():
        tasks, stats = stale_work(
            cfg.output_location, bucket, prepared.prints, cfg.output.retry_errors
        )
        out.append(_with_stats(tasks_table(tasks), stats))
    return pa.concat_tables(out) if out else PLAN_SCHEMA.empty_table()


def plan_on_ray(cfg: JobConfig, prepared: Prepared, *, write: bool = True) -> PlanStats:
    """Plan the job on the cluster; with ``write``, into ``_state/plans/<run_id>/``."""
    output = cfg.output_location
    parts = listing_parts(cfg.input)
    rows = [{"part": pickle.dumps(p)} for p in parts]
    listed = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    listed = listed.map_batches(
        _list_parts, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=1
    )
    kw = {"cfg": cfg, "prepared": prepared}
    bucketed = listed.groupby("bucket").map_groups(
        _new_in_bucket, fn_kwargs=kw, batch_format="pyarrow"
    ).materialize()  # fmt: skip
    refs = bucketed.filter(expr=col("row") == "ref").select_columns(["uri", "image_id"])
    images = refs.map_batches(
        _cut_batch, fn_kwargs=kw, batch_format="pyarrow", batch_size=cfg.output.shard_size
    )
    others = bucketed.filter(expr=col("row") != "ref").drop_columns(["row", "uri", "image_id"])
    plan = images.union(others)
    buckets = [] if cfg.output.mode == "overwrite" else state_buckets(output, SHARDS_DIR)
    if buckets:
        stale = ray.data.from_items([{"bucket": b} for b in buckets]).map_batches(
            _stale_in_buckets,
            fn_kwargs={"cfg": cfg, "prepared": prepared},
            batch_format="pyarrow",
            batch_size=8,
        )
        plan = plan.union(stale)
    if write:  # each task writes a file of the plan and hands on its stats rows only
        stats_rows = plan.map_batches(
            _write_plan_part,
            fn_kwargs={"output": output, "run_id": prepared.run_id},
            batch_format="pyarrow",
            batch_size=PLAN_FILE_TASKS,
        )
    else:
        stats_rows = plan.filter(expr=col("kind") == _STATS).select_columns(["stats"])
    stats = PlanStats()
    for row in stats_rows.iter_rows():
        stats.merge(_stats_from(row["stats"]))
    if stats.listed == 0:
        raise nothing_listed(cfg.input)
    return stats


#: Tasks per plan file (~256 inputs each): ~4,000 files for a 10^9-input first run.
PLAN_FILE_TASKS = 1024


def _write_plan_part(batch: pa.Table, output: Location, run_id: str) -> pa.Table:
    """One file of the plan, named from its tasks (a retried task writes the same file)."""
    is_stats = pc.equal(batch.column("kind"), _STATS)
    tasks = batch.filter(pc.invert(is_stats)).drop_columns(["stats"])
    if tasks.num_rows:
        name = stable_id("\n".join(tasks.column("shard_id").to_pylist()))
        write_plan_file(output, run_id, tasks, name)
    return batch.filter(is_stats).select(["stats"])


#: CPUs of a task that reads plan files or packs their rows: little (I/O, a few KB per
#: task), and it runs beside the model actors, which on a small local Ray hold most
#: CPUs: at Ray's default of 1 it could wait forever behind them (the pool check counts
#: it with the commit task).
PLAN_READ_CPUS = 0.25


def read_plan_dataset(output: Location, run_id: str, kind: str | None = None) -> ray.data.Dataset:
    """A run's tasks (of one ``kind``) as a dataset, one block per plan file: each file
    is read by a task through the job's storage retries."""
    files = [{"file": f.uri} for f in plan_files(output, run_id)]
    ds = ray.data.from_items(files, override_num_blocks=max(1, len(files)))
    return ds.map_batches(
        _read_plan_files,
        fn_kwargs={"output": output, "kind": kind},
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=PLAN_READ_CPUS,
    )


def _read_plan_files(batch: pa.Table, output: Location, kind: str | None) -> pa.Table:
    parts = [read_plan_file(output.with_uri(uri)) for uri in batch.column("file").to_pylist()]
    table = pa.concat_tables(parts) if parts else TASK_SCHEMA.empty_table()
    return table if kind is None else table.filter(pc.equal(table.column("kind"), kind))


_INDEX_ROWS = INDEX_SCHEMA.append(pa.field("ibucket", pa.int32())).append(
    pa.field("counts", pa.string())
)


def _consolidate_group(group: pa.Table, output: Location, run_id: str) -> pa.Table:
    """One shard bucket of a run: its shards rows written, its new index rows and counts
    returned (counts in one extra row whose ``ibucket`` is -1)."""
    bucket = group.column("sbucket")[0].as_py()
    rows = group.drop_columns(["sbucket"]).to_pylist()
    index, lost = consolidate_bucket(output, run_id, bucket, rows)
    counts = {
        "committed": len(rows) - len(lost),
        "uncommitted": len(lost),
        "leftovers_removed": remove_leftovers(output, lost),
    }
    out = [row | {"ibucket": bucket_of(row["image_id"]), "counts": None} for row in index]
    out.append({"ibucket": -1, "counts": json.dumps(counts)})
    return pa.Table.from_pylist(out, schema=_INDEX_ROWS)


def _write_index_group(group: pa.Table, output: Location, run_id: str) -> pa.Table:
    """One image bucket of a run's new index rows, as one file; counts rows pass through."""
    bucket = group.column("ibucket")[0].as_py()
    if bucket >= 0:
        rows = group.select(INDEX_SCHEMA.names)
        write_bucket(output, INDEX_DIR, bucket, run_id, rows)
        return pa.table({"counts": pa.array([], pa.string())})
    return group.select(["counts"])


def consolidate_on_ray(output: Location, run_id: str) -> dict[str, Any]:
    """:func:`plan.local.consolidate_locally` for runs too large for one process."""
    plan = read_plan_dataset(output, run_id)

    def add_bucket(batch: pa.Table) -> pa.Table:
        ids = batch.column("shard_id").to_pylist()
        return batch.append_column("sbucket", pa.array([bucket_of(i) for i in ids], pa.int32()))

    index = (
        plan.map_batches(add_bucket, batch_format="pyarrow")
        .groupby("sbucket")
        .map_groups(
            _consolidate_group,
            fn_kwargs={"output": output, "run_id": run_id},
            batch_format="pyarrow",
        )
    )
    counts_rows = index.groupby("ibucket").map_groups(
        _write_index_group, fn_kwargs={"output": output, "run_id": run_id}, batch_format="pyarrow"
    )
    counts = {"committed": 0, "uncommitted": 0, "leftovers_removed": 0}
    for row in counts_rows.iter_rows():
        for key, n in json.loads(row["counts"]).items():
            counts[key] += n
    counts["tasks"] = counts["committed"] + counts["uncommitted"]
    record = {"run_id": run_id, "consolidated_at": str(utc_now()), "engine": "ray", **counts}
    write_run_record(output, run_id, record)
    logger.info("run %s consolidated on the cluster: %s", run_id, counts)
    return counts
