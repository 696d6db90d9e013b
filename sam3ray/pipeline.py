"""The only module that wires Ray Data: plan on the driver, stream shards through
decode (CPU tasks) → SAM 3 (actor pool, fractional GPUs) → write (CPU tasks).

Everything that can fail before a GPU is spent is checked first, without Ray:
the config, both prompt tables, the checkpoint's existence, the input listing.
The driver keeps only one small summary row per shard, so its memory does not
grow with the number of detections.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from functools import partial
from typing import Any

from sam3ray.config import ConfigError, JobConfig
from sam3ray.config_checks import redact
from sam3ray.inputs import retry_transient
from sam3ray.metrics import RayMetrics
from sam3ray.orphans import reconcile_orphans
from sam3ray.output import write_run_summary
from sam3ray.planning import JobPlan, plan_job
from sam3ray.stages import FAULT_ENV_VARS, SegmentShard, SegmentSpec, decode_shard, write_shard
from sam3ray.summary import versions

logger = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The job ran but broke its promise (e.g. the error rate exceeded ``max_error_rate``)."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


class _SegmentActor:
    """Ray adapter: one SegmentShard per actor, model loaded in the constructor."""

    def __init__(self, spec: SegmentSpec) -> None:
        self.stage = SegmentShard(spec)
        self.stage.setup()

    def __call__(self, batch):
        import pyarrow as pa

        return pa.Table.from_pylist([self.stage(row) for row in batch.to_pylist()])


def _init_ray(cfg: JobConfig) -> float:
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": cfg.resources.ray_address, "log_to_driver": True}
        if cfg.resources.object_store_memory and _is_local(cfg):
            kwargs["object_store_memory"] = cfg.resources.object_store_memory
        ray.init(**kwargs)
    return time.perf_counter() - t0


def _is_local(cfg: JobConfig) -> bool:
    return cfg.resources.ray_address in (None, "local")


#: CPUs each write task asks for (small: it only serialises Parquet).
WRITE_CPUS = 0.25


def check_pool_fits(cfg: JobConfig, n_shards: int) -> None:
    """Refuse a pool whose minimum leaves no CPU for decode and write tasks: Ray
    would wait forever. Only for a local Ray, whose size is all it will ever be
    (an autoscaling cluster may add nodes)."""
    import ray

    if not _is_local(cfg) or n_shards == 0:
        return
    r = cfg.resources
    lo = min(r.actors[0], n_shards)
    need = lo * r.cpus_per_actor + r.decode_cpus + WRITE_CPUS
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(
            f"resources: the actor pool's minimum ({lo} × resources.cpus_per_actor "
            f"{r.cpus_per_actor}) plus one decode task (resources.decode_cpus {r.decode_cpus}) "
            f"and one write task ({WRITE_CPUS}) needs {need:g} CPUs, but this Ray has "
            f"{have:g}: lower resources.actors[0] or resources.cpus_per_actor"
        )


def _gpus_per_actor(cfg: JobConfig) -> float:
    """Fall back to CPU actors on a cluster without GPUs unless CUDA was demanded."""
    import ray

    want = cfg.resources.gpus_per_actor
    have = ray.cluster_resources().get("GPU", 0)
    if want > 0 and have == 0:
        if cfg.model.device == "cuda":
            raise RuntimeError("model.device is 'cuda' but the Ray cluster has no GPUs")
        logger.warning("no GPUs in the Ray cluster: running SAM 3 actors on CPU")
        return 0.0
    return want


def _shard_rows(cfg: JobConfig, plan: JobPlan, video_stats: dict):
    """Summary rows of every shard done now: images first, then videos (+ stitching)."""
    if plan.todo:
        yield from _dataset(cfg, plan).iter_rows()
    if plan.video_refs:  # also when nothing is to do: finishes stitching after a crash
        from sam3ray.pipeline_video import run_video_shards

        yield from run_video_shards(
            cfg,
            plan.run_id,
            plan.concepts,
            plan.geometric,
            plan.video_refs,
            plan.markers,
            stats=video_stats,
            plan=plan.video_plan,
        )


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the job end to end and return the run summary (also written to runs/)."""
    t_start = time.perf_counter()
    out_uri, out_opts = cfg.output.uri, cfg.output_storage_options
    plan = plan_job(cfg)
    totals: Counter = Counter()
    reasons: Counter = Counter()
    per_concept: Counter = Counter()
    actors: dict[int, int] = {}
    video_stats: dict[str, Any] = {}
    ray_init_s = first_result_s = 0.0
    # steady-state rate from the actors' finish times: images after the first
    # finished shard ÷ (last finish − first finish); excludes start-up fairly
    first_finish: tuple[float, int] | None = None
    last_finish = 0.0
    t_pipe = time.perf_counter()
    if plan.todo or plan.video_refs:
        ray_init_s = _init_ray(cfg)
        check_pool_fits(cfg, len(plan.todo) + len(plan.video_plan[0]))
        t_pipe = time.perf_counter()
        for row in _shard_rows(cfg, plan, video_stats):
            if not first_result_s:
                first_result_s = time.perf_counter() - t_pipe
            if first_finish is None or row["finished_at"] < first_finish[0]:
                first_finish = (row["finished_at"], row["n_inputs"])
            last_finish = max(last_finish, row["finished_at"])
            for key in ("n_inputs", "n_ok", "n_error", "n_detections"):
                totals[key] += row[key]
            reasons.update(json.loads(row["errors_by_reason"]))
            per_concept.update(json.loads(row["detections_by_concept"]))
            actors[row["actor_pid"]] = max(actors.get(row["actor_pid"], 0), row["actor_loads"])
            totals["shards"] += 1
    pipe_s = time.perf_counter() - t_pipe
    # Only now, with every current shard committed, may orphans give up their rows.
    orphans = (
        reconcile_orphans(
            out_uri, out_opts, {sid: plan.markers[sid] for sid in plan.orphans}, plan.current_ids()
        )
        if plan.orphans
        else {}
    )
    t_end = time.perf_counter()
    steady_s = last_finish - first_finish[0] if first_finish else 0.0
    steady_images = totals["n_inputs"] - (first_finish[1] if first_finish else 0)
    video_stats.pop("shard_ids", None)
    summary = {
        "run_id": plan.run_id,
        "output": out_uri,
        "status": "succeeded",
        "inputs_total": plan.inputs_total,
        "inputs_processed": totals["n_inputs"],
        "inputs_skipped_done": plan.skipped_inputs,
        "ok": totals["n_ok"],
        "errors": totals["n_error"],
        "errors_by_reason": dict(reasons),
        "detections": totals["n_detections"],
        "detections_by_concept": dict(per_concept),
        "shards": {
            "done_now": totals["shards"],
            "skipped": len(plan.skipped) + len(plan.video_plan[1]),
            "relabelled": len(plan.relabelled),
            "orphaned": len(plan.orphans),
            "orphans": orphans,
        },
        "labelling_settings": plan.settings,
        "videos": {"inputs": len(plan.video_refs), **video_stats},
        "actors": {"count": len(actors), "model_loads_per_actor": sorted(actors.values())},
        "timing_s": {
            "plan": round(plan.plan_s, 3),
            "ray_init": round(ray_init_s, 3),
            "first_shard": round(first_result_s, 3),
            "pipeline": round(pipe_s, 3),
            "total": round(t_end - t_start, 3),
        },
        "throughput": {
            "images_per_s": round(totals["n_inputs"] / pipe_s, 3) if pipe_s > 0 else None,
            "images_per_s_after_first_shard": (
                round(steady_images / steady_s, 3) if steady_s > 0 else None
            ),
        },
        "versions": versions(),
        "config": redact(cfg),
    }
    processed = totals["n_inputs"]
    rate = totals["n_error"] / processed if processed else 0.0
    if rate > cfg.output.max_error_rate:
        summary["status"] = "failed"
        summary["failure"] = (
            f"error rate {rate:.3f} exceeds output.max_error_rate {cfg.output.max_error_rate}"
        )
    summary["summary_uri"] = retry_transient(  # idempotent: one object, written whole
        lambda: write_run_summary(out_uri, out_opts, plan.run_id, summary),
        f"writing the run summary to {out_uri}",
        retries=8,
        base_delay=0.5,
        max_delay=30.0,
    )
    if summary["status"] == "failed":
        raise JobFailed(summary["failure"], summary)
    return summary


def actor_pool_args(cfg: JobConfig, n_rows: int) -> dict[str, Any]:
    """``map_batches`` arguments for a SAM 3 actor pool (image and video jobs alike):
    one shard per call, autoscaling (min, max) capped by the work, fractional GPUs,
    actors restarted and their shards retried after a crash."""
    import ray

    lo, hi = cfg.resources.actors
    hi = min(hi, n_rows)
    return {
        "batch_size": 1,
        "batch_format": "pyarrow",
        "compute": ray.data.ActorPoolStrategy(min_size=min(lo, hi), max_size=hi),
        "num_gpus": _gpus_per_actor(cfg),
        "num_cpus": cfg.resources.cpus_per_actor,
        # No max_restarts/max_task_retries: Ray Data's actor pools already default to
        # -1/-1 (a dead actor is restarted and its shard retried), and passing them
        # through ray_remote_args is deprecated in Ray 2.60.
        **_fault_injection_env(),
    }


def _dataset(cfg: JobConfig, plan: JobPlan):
    import ray

    run_id, todo, markers = plan.run_id, plan.todo, plan.markers

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    rows = [
        {
            "shard_id": s.shard_id,
            "members_hash": s.members_hash,
            "settings_hash": s.settings_hash,
            "uris": list(s.uris),
            "image_ids": list(s.image_ids),
            "previous_files": list(markers[s.shard_id].files) if s.shard_id in markers else [],
        }
        for s in todo
    ]
    inf = cfg.inference
    spec = SegmentSpec(
        checkpoint=cfg.model.checkpoint,
        concepts=plan.concepts,
        geometric=plan.geometric,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        compile=cfg.model.compile,
        cache_dir=cfg.model.cache_dir,
        storage_options=cfg.model_storage_options,
        images_per_batch=inf.images_per_batch,
        engine={
            "conf": inf.conf,
            "iou": inf.iou,
            "nms": inf.nms,
            "max_det": inf.max_det,
            "max_imgsz": inf.max_imgsz,
            "queries_per_forward": inf.queries_per_forward,
        },
        run_id=run_id,
        metrics=RayMetrics(),
    )
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(
        partial(
            decode_shard,
            storage_options=dict(cfg.input.storage_options),
            max_pixels=cfg.input.max_pixels,
            max_imgsz=inf.max_imgsz,
        ),
        num_cpus=cfg.resources.decode_cpus,
    )
    ds = ds.map_batches(
        _SegmentActor, fn_constructor_args=(spec,), **actor_pool_args(cfg, len(rows))
    )
    return ds.map(
        partial(
            write_shard,
            output_uri=cfg.output.uri,
            storage_options=cfg.output_storage_options,
            run_id=run_id,
        ),
        num_cpus=WRITE_CPUS,
    )


def _fault_injection_env() -> dict[str, Any]:
    """Forward the tests' fault-injection switches (stages.FAULT_ENV_VARS) to the actors.

    Nothing is added unless the driver's environment sets one, so a normal job's
    actors get no runtime_env of their own. Needed because a Ray started earlier
    (a shared test session) does not see variables the driver sets later.
    """
    env = {k: os.environ[k] for k in FAULT_ENV_VARS if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}
