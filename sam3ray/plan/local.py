"""The planning engine for small jobs: the bucket work of ``plan.buckets``, in this process.

Starting Ray Data shuffles for a few hundred inputs costs more than the job, so
small jobs (up to ``plan.local_max_inputs``) are listed, planned and
consolidated here, with the same per-bucket functions the cluster engine runs.
Past the cap the listing stops (:class:`TooLarge`) and the runner hands the job
to the cluster engine: the driver never holds more than the cap.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from sam3ray.config.schema import JobConfig
from sam3ray.core.shards import InputRef, ShardTask
from sam3ray.output.schema import utc_now
from sam3ray.output.state import (
    SHARDS_DIR,
    Held,
    bucket_of,
    held_inputs,
    read_plan,
    state_buckets,
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
    write_index,
)
from sam3ray.plan.job import Prepared
from sam3ray.plan.shards import new_image_tasks
from sam3ray.sources.listing import listing_parts, nothing_listed, read_part
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)


class TooLarge(Exception):
    """More inputs (or tasks) than ``plan.local_max_inputs``: plan on the cluster."""


def _listed(cfg: JobConfig, cap: int) -> Iterator[InputRef]:
    n = 0
    for part in listing_parts(cfg.input):
        for uri in read_part(cfg.input, part):
            n += 1
            if n > cap:
                raise TooLarge(f"more than {cap} inputs")
            yield InputRef.of(uri)


def plan_locally(cfg: JobConfig, prepared: Prepared) -> tuple[list[ShardTask], PlanStats]:
    """Every task of the job (new shards, stale shards), and what they amount to.

    ``output.mode: overwrite`` plans against an empty output (it is cleared before
    labelling starts).
    """
    output = cfg.output_location
    fresh = cfg.output.mode == "overwrite"
    by_bucket: dict[int, list[InputRef]] = defaultdict(list)
    for ref in _listed(cfg, cfg.plan.local_max_inputs):
        by_bucket[bucket_of(ref.image_id)].append(ref)
    if not by_bucket:
        raise nothing_listed(cfg.input)
    tasks: list[ShardTask] = []
    new_images: list[InputRef] = []
    stats = PlanStats()
    for bucket, refs in sorted(by_bucket.items()):
        held = Held() if fresh else held_inputs(output, bucket)
        images, videos, counts = new_work(bucket, refs, cfg.input, cfg.video, prepared.prints, held)
        new_images += images
        tasks += videos
        stats.merge(counts)
    image_tasks = new_image_tasks(new_images, cfg.output.shard_size, prepared.prints)
    count_fresh(stats, image_tasks)
    tasks = image_tasks + tasks
    for bucket in [] if fresh else state_buckets(output, SHARDS_DIR):
        found, counts = stale_work(output, bucket, prepared.prints, cfg.output.retry_errors)
        tasks += found
        stats.merge(counts)
    return tasks, stats


def write_plan(output: Location, run_id: str, tasks: list[ShardTask]) -> None:
    """The run's tasks, where the labelling pipeline streams them from."""
    write_plan_file(output, run_id, tasks_table(tasks))


def consolidate_locally(output: Location, run_id: str, cap: int) -> dict[str, Any]:
    """Fold what ``run_id`` committed into the state, remove what it left half-done,
    and record it as consolidated. Returns counts."""
    plan = read_plan(output, run_id)
    if plan.num_rows > cap:
        raise TooLarge(f"{plan.num_rows} tasks")
    by_bucket: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in plan.to_pylist():
        by_bucket[bucket_of(row["shard_id"])].append(row)
    index: list[dict[str, Any]] = []
    lost: list[dict[str, Any]] = []
    for bucket, rows in sorted(by_bucket.items()):
        found, missing = consolidate_bucket(output, run_id, bucket, rows)
        index += found
        lost += missing
    write_index(output, run_id, index)
    removed = remove_leftovers(output, lost)
    counts = {
        "tasks": plan.num_rows,
        "committed": plan.num_rows - len(lost),
        "uncommitted": len(lost),
        "leftovers_removed": removed,
    }
    write_run_record(
        output, run_id, {"run_id": run_id, "consolidated_at": str(utc_now()), **counts}
    )
    logger.info("run %s consolidated: %s", run_id, counts)
    return counts
