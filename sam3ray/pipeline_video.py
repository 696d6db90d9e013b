"""Ray wiring of the video job: plan → track (actor pool) → write → stitch per video.

``run_video_shards`` is meant to be merged into ``pipeline.run_job``: it yields
one summary row per video shard, with the same keys as the image job's
per-shard rows, so the caller's counters work unchanged. After the last shard
row it stitches every video of the plan (Ray tasks, one per video; a no-op
for videos already stitched from the same shard versions) before returning,
so when the iterator is exhausted every video has global track ids. Like
``pipeline.py``, this module imports Ray only inside functions.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

from sam3ray.fingerprint import Fingerprinter
from sam3ray.pipeline import WRITE_CPUS, _init_ray, actor_pool_args
from sam3ray.video_plan import VideoShard, plan_video_shards
from sam3ray.video_stages import TrackShard, TrackSpec, write_video_shard

logger = logging.getLogger(__name__)


class _TrackActor:
    """Ray adapter: one TrackShard per actor, model loaded in the constructor."""

    def __init__(self, spec: TrackSpec) -> None:
        self.stage = TrackShard(spec)
        self.stage.setup()

    def __call__(self, batch):
        import pyarrow as pa

        rows = [self.stage(json.loads(r["payload"])) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows)


def track_spec(cfg, run_id: str, concepts, geometric) -> TrackSpec:
    """The actor spec of a job config (also used by tests and the benchmark)."""
    return TrackSpec(
        checkpoint=cfg.model.checkpoint,
        concepts=concepts,
        geometric=geometric,
        device=cfg.model.device,
        cache_dir=cfg.model.cache_dir,
        model_storage_options=cfg.model_storage_options,
        input_storage_options=dict(cfg.input.storage_options),
        conf=cfg.inference.conf,
        iou=cfg.inference.iou,
        run_id=run_id,
        feature_cache_mib=cfg.video.feature_cache_mib,
    )


def run_video_shards(
    cfg,
    run_id: str,
    concepts,
    geometric,
    video_refs: Sequence[Any],
    markers: Mapping[str, Any],
    *,
    stats: dict[str, Any] | None = None,
    plan: tuple[list[VideoShard], list[VideoShard]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Track every video shard still to do, yield its summary row, then stitch.

    ``plan``: the result of :func:`plan_video` when the caller planned already
    (e.g. to exclude video shard ids from its orphan check); else planned here.
    ``stats`` (optional, filled in place): ``shards_todo``, ``shards_skipped``,
    ``shard_ids`` (every planned video shard id), ``stitch`` (counts by
    outcome) and ``stitch_s``.
    """
    stats = stats if stats is not None else {}
    if plan is None:
        plan = plan_video(cfg, video_refs, markers, Fingerprinter(cfg, concepts, geometric))
    todo, skipped = plan
    stats.update(
        shards_todo=len(todo),
        shards_skipped=len(skipped),
        shard_ids=[s.shard_id for s in todo + skipped],
    )
    if not todo and not skipped:
        return
    _init_ray(cfg)
    if todo:
        yield from _dataset(cfg, run_id, concepts, geometric, todo, markers).iter_rows()
    t0 = time.perf_counter()
    stats["stitch"] = stitch_all(cfg, todo + skipped)
    stats["stitch_s"] = round(time.perf_counter() - t0, 3)


def plan_video(
    cfg, video_refs: Sequence[Any], markers: Mapping[str, Any], fingerprint: Fingerprinter
):
    """(todo, skipped) video shards of a job (probes every video; no Ray needed).
    A video's shards share one settings fingerprint (its exemplars included)."""
    return plan_video_shards(
        video_refs,
        cfg.video,
        markers,
        cfg.output.retry_errors,
        cfg.input.storage_options,
        lambda s: fingerprint.for_inputs([(s.uri, s.video_id)]),
    )


def _dataset(cfg, run_id, concepts, geometric, todo: Sequence[VideoShard], markers):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    rows = []
    for s in todo:
        previous = markers[s.shard_id].files if s.shard_id in markers else ()
        rows.append({"shard_id": s.shard_id, "payload": json.dumps(s.to_row(previous))})
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        _TrackActor,
        fn_constructor_args=(track_spec(cfg, run_id, concepts, geometric),),
        **actor_pool_args(cfg, len(rows)),
    )
    return ds.map(
        partial(
            write_video_shard,
            output_uri=cfg.output.uri,
            storage_options=cfg.output_storage_options,
            run_id=run_id,
        ),
        num_cpus=WRITE_CPUS,
    )


def stitch_all(cfg, shards: Sequence[VideoShard]) -> dict[str, int]:
    """Stitch every video that has shards in ``shards`` (Ray tasks); counts by status."""
    import ray

    from sam3ray.video_output import stitch_video

    by_video: dict[str, list[VideoShard]] = defaultdict(list)
    for s in shards:
        by_video[s.video_id].append(s)
    task = ray.remote(num_cpus=0.25, max_retries=3)(stitch_video)
    refs = [
        task.remote(
            cfg.output.uri,
            cfg.output_storage_options,
            [s.to_row() for s in sorted(group, key=lambda s: s.index)],
            cfg.video.stitch_iou,
        )
        for group in by_video.values()
    ]
    counts: dict[str, int] = defaultdict(int)
    for result in ray.get(refs):
        counts[result["status"]] += 1
        counts["rewritten_shards"] += result.get("rewritten", 0)
    return dict(counts)
