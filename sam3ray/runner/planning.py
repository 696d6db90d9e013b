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
import ray
from ray.data.expressions import col

from sam3ray.config.schema import JobConfig
from sam3ray.core.shards import InputRef
from sam3ray.output.schema import utc_now
from sam3ray.output.state import (
    INDEX_DIR,
    INDEX_SCHEMA,
    SHARDS_DIR,
    TASK_SCHEMA,
    bucket_of,
    plan_dir,
    state_buckets,
    write_bucket,
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


def _list_part(row: dict[str, Any], cfg: JobConfig) -> list[dict[str, Any]]:
    part = pickle.loads(row["part"])
    out = []
    for uri in read_part(cfg.input, part):
        ref = InputRef.of(uri)
        out.append({"uri": ref.uri, "image_id": ref.image_id, "bucket": bucket_of(ref.image_id)})
    return out


#: What a bucket's task returns: its new images (``row`` = "ref"), its new videos' tasks
#: ("task") and its counts ("stats").
_BUCKET_SCHEMA = (
    PLAN_SCHEMA.append(pa.field("row", pa.string()))
    .append(pa.field("uri", pa.string()))
    .append(pa.field("image_id", pa.string()))
)


def _new_in_bucket(group: pa.Table, cfg: JobConfig, prepared: Prepared) -> pa.Table:
    uris, ids = group.column("uri").to_pylist(), group.column("image_id").to_pylist()
    refs = [InputRef(u, i) for u, i in zip(uris, ids, strict=True)]
    bucket = group.column("bucket")[0].as_py()
    images, videos, stats = new_work(
        cfg.output_location, bucket, refs, cfg.input, cfg.video, prepared.prints,
        cfg.output.mode == "overwrite",
    )  # fmt: skip
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
    listed = listed.flat_map(_list_part, fn_kwargs={"cfg": cfg})
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
    if write:
        where = output.child(plan_dir(prepared.run_id))
        plan.write_parquet(where.path, filesystem=where.arrow_filesystem())
        stats_rows = read_plan_dataset(output, prepared.run_id, stats=True)
    else:
        stats_rows = plan.filter(lambda r: r["kind"] == _STATS)
    stats = PlanStats()
    for row in stats_rows.select_columns(["stats"]).iter_rows():
        stats.merge(_stats_from(row["stats"]))
    if stats.listed == 0:
        raise nothing_listed(cfg.input)
    return stats


def read_plan_dataset(output: Location, run_id: str, *, stats: bool = False) -> ray.data.Dataset:
    """A run's plan as a dataset of task rows (or of its stats rows)."""
    where = output.child(plan_dir(run_id))
    ds = ray.data.read_parquet(where.path, filesystem=where.arrow_filesystem())
    if "stats" not in ds.schema().names:  # written by the local engine: tasks only
        return ds.limit(0) if stats else ds
    keep = (col("kind") == _STATS) if stats else (col("kind") != _STATS)
    return ds.filter(expr=keep)


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
    plan = read_plan_dataset(output, run_id).drop_columns(
        ["stats"],
    )

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
