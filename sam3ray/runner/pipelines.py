"""The job's Ray Data pipelines, built from stages through the one adapter.

    plan ─► images: ShardTask ─► SegmentStage (actors: read + decode + label) ─► CommitStage
    plan ─► videos: ShardTask ─► TrackStage (actors: decode + track) ─► CommitStage
            then a stitch task per video

Only one small :class:`~sam3ray.stages.tasks.CommitSummary` per shard comes
back to the driver.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray

from sam3ray.config.schema import JobConfig
from sam3ray.core.shards import Shard
from sam3ray.output.state import span_from, task_from_row
from sam3ray.output.video import restitch_video, stitch_video, stitched_videos
from sam3ray.plan.job import JobPlan
from sam3ray.runner.adapter import apply, pack, results
from sam3ray.runner.metrics import RayMetrics
from sam3ray.runner.planning import PLAN_READ_CPUS, read_plan_dataset
from sam3ray.stages.commit import CommitStage
from sam3ray.stages.segment import SegmentStage
from sam3ray.stages.tasks import CommitSummary
from sam3ray.stages.track import TrackStage

#: CPUs of one per-video stitch task (reads staging files, rewrites a few shards).
STITCH_CPUS = 0.25


def _model_stage(cfg: JobConfig, plan: JobPlan, kind: str) -> SegmentStage | TrackStage:
    """The model stage of a kind of shard, built from the job's sections."""
    concepts = plan.prepared.concepts
    common = {
        "run_id": plan.run_id,
        "checkpoint": cfg.checkpoint_location,
        "geometric": plan.prepared.geometric,
        "metrics": RayMetrics(),
    }
    if kind == "video":
        return TrackStage(
            cfg.model, cfg.inference, cfg.video, cfg.input, cfg.resources, concepts, **common
        )
    return SegmentStage(cfg.model, cfg.inference, cfg.input, cfg.resources, concepts, **common)


def _packed_tasks(batch: pa.Table) -> pa.Table:
    rows = [pack(task_from_row(r), r["shard_id"]) for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=_PACKED)


_PACKED = pa.schema([("key", pa.string()), ("payload", pa.binary())])


def label_pipeline(
    cfg: JobConfig, plan: JobPlan, kind: str, num_gpus: float
) -> Iterator[CommitSummary]:
    """Label and commit every task of one kind ("image" or "video") of the run's plan.

    The tasks stream from ``_state/plans/<run_id>/`` (never through the driver). The
    model actors read and decode their own inputs (images in a bounded prefetch pool,
    video frames straight into the model's input tensor), so rows carry URIs.
    """
    n = plan.stats.kinds.get(kind, 0)
    if not n:
        return
    output = cfg.output_location
    ds = read_plan_dataset(output, plan.run_id, kind)
    # One shard per block, streamed: a plan file holds many tasks, and Ray Data hands
    # an actor a whole block, so unsplit blocks serialise the pool. A block-size target
    # below any row makes every map's output one-row blocks. (Not ds.repartition: it
    # runs as a task of its own at 1 CPU, which on a small local Ray waits forever
    # behind the actors.)
    ds.context.target_max_block_size = 1
    ds = ds.map_batches(
        _packed_tasks, batch_format="pyarrow", batch_size=1, num_cpus=PLAN_READ_CPUS
    )
    ds = apply(ds, _model_stage(cfg, plan, kind), n_rows=n, num_gpus=num_gpus)
    ds = apply(ds, CommitStage(output, plan.run_id), n_rows=n)
    yield from results(ds)


def stitch_videos(cfg: JobConfig, plan: JobPlan, restitch_all: bool) -> dict[str, int]:
    """Stitch every video a task of this run touched (or, with ``restitch_all`` after a
    ``video.stitch_iou`` change, every video of the output): a Ray task each.

    Runs after every shard of the run committed; idempotent.
    """
    output = cfg.output_location
    by_video: dict[str, list[Shard]] = defaultdict(list)
    if plan.stats.kinds.get("video"):
        rows = read_plan_dataset(output, plan.run_id, "video")
        for row in rows.select_columns(
            ["shard_id", "kind", "uris", "image_ids", "span"]
        ).iter_rows():
            shard = Shard(
                row["shard_id"], "video", tuple(row["uris"]), tuple(row["image_ids"]),
                span_from(row["span"]),
            )  # fmt: skip
            by_video[shard.image_ids[0]].append(shard)
    task = ray.remote(num_cpus=STITCH_CPUS, max_retries=3)(stitch_video)
    refs = [task.remote(output, group, cfg.video.stitch_iou) for group in by_video.values()]
    if restitch_all:
        again = ray.remote(num_cpus=STITCH_CPUS, max_retries=3)(restitch_video)
        others = [v for v in stitched_videos(output) if v not in by_video]
        refs += [again.remote(output, v, cfg.video.stitch_iou) for v in others]
    counts: dict[str, Any] = defaultdict(int)
    for result in ray.get(refs):
        counts[result["status"]] += 1
        counts["rewritten_shards"] += result.get("rewritten", 0)
    return dict(counts)
