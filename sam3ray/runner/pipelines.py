"""The job's Ray Data pipelines, built from stages through the one adapter.

    images: ShardTask ─► SegmentStage (actors: read + decode + label) ─► CommitStage (tasks)
    videos: ShardTask ─► TrackStage (actors: decode + track) ─► CommitStage (tasks)
            then a stitch task per video

Only one small :class:`~sam3ray.stages.tasks.CommitSummary` per shard comes
back to the driver.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from sam3ray.config.schema import JobConfig
from sam3ray.core.shards import Shard
from sam3ray.output.video import stitch_video
from sam3ray.plan.job import JobPlan
from sam3ray.runner.adapter import apply, dataset_of, results
from sam3ray.runner.metrics import RayMetrics
from sam3ray.stages.commit import CommitStage
from sam3ray.stages.segment import SegmentStage
from sam3ray.stages.tasks import CommitSummary, ShardTask
from sam3ray.stages.track import TrackStage

#: CPUs of one per-video stitch task (reads staging files, rewrites a few shards).
STITCH_CPUS = 0.25


def _model_stage(cfg: JobConfig, plan: JobPlan, kind: str) -> SegmentStage | TrackStage:
    """The model stage of a kind of shard, built from the job's sections."""
    common = {
        "run_id": plan.run_id,
        "checkpoint": cfg.checkpoint_location,
        "geometric": plan.geometric,
        "metrics": RayMetrics(),
    }
    if kind == "video":
        return TrackStage(
            cfg.model, cfg.inference, cfg.video, cfg.input, cfg.resources, plan.concepts, **common
        )
    return SegmentStage(cfg.model, cfg.inference, cfg.input, cfg.resources, plan.concepts, **common)


def label_pipeline(
    cfg: JobConfig, plan: JobPlan, kind: str, num_gpus: float
) -> Iterator[CommitSummary]:
    """Label and commit every shard of one kind ("image" or "video") of the plan.

    The model actors read and decode their own inputs (images in a bounded prefetch
    pool, video frames straight into the model's input tensor), so rows carry URIs.
    """
    tasks = [ShardTask(s, plan.previous_files(s.shard_id)) for s in plan.shards(kind)]
    if not tasks:
        return
    n = len(tasks)
    ds = dataset_of(tasks)
    ds = apply(ds, _model_stage(cfg, plan, kind), n_rows=n, num_gpus=num_gpus)
    ds = apply(ds, CommitStage(cfg.output_location, plan.run_id), n_rows=n)
    yield from results(ds)


def stitch_videos(cfg: JobConfig, shards: Sequence[Shard]) -> dict[str, int]:
    """Stitch every video that has shards in ``shards`` (a Ray task each); counts by status.

    Runs after every shard of the run committed, also for videos with nothing to
    do now: it finishes a stitch a crash interrupted, and is a no-op otherwise.
    """
    by_video: dict[str, list[Shard]] = defaultdict(list)
    for s in shards:
        if s.kind == "video":
            by_video[s.image_ids[0]].append(s)
    task = ray.remote(num_cpus=STITCH_CPUS, max_retries=3)(stitch_video)
    refs = [
        task.remote(
            cfg.output_location,
            sorted(group, key=lambda s: s.span.index),
            cfg.video.stitch_iou,
        )
        for group in by_video.values()
    ]
    counts: dict[str, Any] = defaultdict(int)
    for result in ray.get(refs):
        counts[result["status"]] += 1
        counts["rewritten_shards"] += result.get("rewritten", 0)
    return dict(counts)
