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
import uuid
from collections import Counter
from functools import partial
from typing import Any

from sam3ray.config import JobConfig, redact, validate_paths
from sam3ray.inputs import list_inputs, retry_transient
from sam3ray.output import clear_output, scan_markers, write_run_summary
from sam3ray.prompts import load_concepts, load_geometric
from sam3ray.shards import orphaned_shard_ids, plan_shards
from sam3ray.stages import FAULT_ENV_VARS, SegmentShard, SegmentSpec, decode_shard, write_shard

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


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sam3ray", "sam3", "torch", "ray", "pyarrow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _init_ray(cfg: JobConfig) -> float:
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": cfg.resources.ray_address, "log_to_driver": True}
        if cfg.resources.object_store_memory and not cfg.resources.ray_address:
            kwargs["object_store_memory"] = cfg.resources.object_store_memory
        ray.init(**kwargs)
    return time.perf_counter() - t0


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


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the image job end to end and return the run summary (also written to runs/)."""
    t_start = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    out_uri, out_opts = cfg.output.uri, cfg.output_storage_options

    # -- everything checked before Ray starts ------------------------------------------
    validate_paths(cfg)
    concepts = load_concepts(cfg.prompts.concepts, cfg.input.storage_options)
    geometric = (
        load_geometric(cfg.prompts.geometric, concepts, cfg.input.storage_options)
        if cfg.prompts.geometric
        else None
    )
    refs = list_inputs(cfg.input)
    if cfg.output.mode == "overwrite":
        retry_transient(lambda: clear_output(out_uri, out_opts), f"clearing {out_uri}")
    markers = (
        retry_transient(lambda: scan_markers(out_uri, out_opts), f"listing markers in {out_uri}")
        if cfg.output.mode == "resume"
        else {}
    )
    todo, skipped = plan_shards(refs, cfg.output.shard_size, markers, cfg.output.retry_errors)
    orphans = orphaned_shard_ids(todo + skipped, markers)
    if orphans:
        logger.warning(
            "%d shards in %s belong to no current input (inputs removed since?): left as is",
            len(orphans),
            out_uri,
        )
    t_planned = time.perf_counter()
    logger.info(
        "%d inputs, %d concepts, %d shards to do, %d already done",
        len(refs),
        len(concepts),
        len(todo),
        len(skipped),
    )

    totals: Counter = Counter()
    reasons: Counter = Counter()
    per_concept: Counter = Counter()
    actors: dict[int, int] = {}
    ray_init_s = first_result_s = 0.0
    images_after_first = 0
    t_pipe = time.perf_counter()
    if todo:
        ray_init_s = _init_ray(cfg)
        t_pipe = time.perf_counter()
        for row in _dataset(cfg, run_id, concepts, geometric, todo, markers).iter_rows():
            if not first_result_s:
                first_result_s = time.perf_counter() - t_pipe
            else:
                images_after_first += row["n_inputs"]
            for key in ("n_inputs", "n_ok", "n_error", "n_detections"):
                totals[key] += row[key]
            reasons.update(json.loads(row["errors_by_reason"]))
            per_concept.update(json.loads(row["detections_by_concept"]))
            actors[row["actor_pid"]] = max(actors.get(row["actor_pid"], 0), row["actor_loads"])
            totals["shards"] += 1
    t_end = time.perf_counter()
    pipe_s = t_end - t_pipe
    steady_s = pipe_s - first_result_s
    summary = {
        "run_id": run_id,
        "output": out_uri,
        "status": "succeeded",
        "inputs_total": len(refs),
        "inputs_processed": totals["n_inputs"],
        "inputs_skipped_done": sum(len(s) for s in skipped),
        "ok": totals["n_ok"],
        "errors": totals["n_error"],
        "errors_by_reason": dict(reasons),
        "detections": totals["n_detections"],
        "detections_by_concept": dict(per_concept),
        "shards": {"done_now": totals["shards"], "skipped": len(skipped), "orphaned": orphans},
        "actors": {"count": len(actors), "model_loads_per_actor": sorted(actors.values())},
        "timing_s": {
            "plan": round(t_planned - t_start, 3),
            "ray_init": round(ray_init_s, 3),
            "first_shard": round(first_result_s, 3),
            "pipeline": round(pipe_s, 3),
            "total": round(t_end - t_start, 3),
        },
        "throughput": {
            "images_per_s": round(totals["n_inputs"] / pipe_s, 3) if pipe_s > 0 else None,
            "images_per_s_after_first_shard": (
                round(images_after_first / steady_s, 3) if steady_s > 0 else None
            ),
        },
        "versions": _versions(),
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
        lambda: write_run_summary(out_uri, out_opts, run_id, summary),
        f"writing the run summary to {out_uri}",
        retries=8,
        base_delay=0.5,
        max_delay=30.0,
    )
    if summary["status"] == "failed":
        raise JobFailed(summary["failure"], summary)
    return summary


def _dataset(cfg, run_id, concepts, geometric, todo, markers):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    rows = [
        {
            "shard_id": s.shard_id,
            "members_hash": s.members_hash,
            "uris": list(s.uris),
            "image_ids": list(s.image_ids),
            "previous_files": list(markers[s.shard_id].files) if s.shard_id in markers else [],
        }
        for s in todo
    ]
    inf = cfg.inference
    spec = SegmentSpec(
        checkpoint=cfg.model.checkpoint,
        concepts=concepts,
        geometric=geometric,
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
    )
    lo, hi = cfg.resources.actors
    hi = min(hi, len(rows))
    lo = min(lo, hi)
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
        _SegmentActor,
        fn_constructor_args=(spec,),
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_gpus=_gpus_per_actor(cfg),
        num_cpus=cfg.resources.cpus_per_actor,
        max_restarts=-1,
        max_task_retries=-1,
        **_fault_injection_env(),
    )
    return ds.map(
        partial(
            write_shard,
            output_uri=cfg.output.uri,
            storage_options=cfg.output_storage_options,
            run_id=run_id,
        ),
        num_cpus=0.25,
    )


def _fault_injection_env() -> dict[str, Any]:
    """Forward the tests' fault-injection switches (stages.FAULT_ENV_VARS) to the actors.

    Nothing is added unless the driver's environment sets one, so a normal job's
    actors get no runtime_env of their own. Needed because a Ray started earlier
    (a shared test session) does not see variables the driver sets later.
    """
    env = {k: os.environ[k] for k in FAULT_ENV_VARS if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def summary_text(summary: dict[str, Any]) -> str:
    """The human-readable end-of-job report the CLI prints."""
    t = summary["timing_s"]
    lines = [
        f"run {summary['run_id']}: {summary['status']}",
        f"  inputs {summary['inputs_total']} (processed {summary['inputs_processed']}, "
        f"already done {summary['inputs_skipped_done']}): "
        f"ok {summary['ok']}, errors {summary['errors']}",
    ]
    for reason, n in sorted(summary["errors_by_reason"].items()):
        lines.append(f"    error {reason}: {n}")
    lines.append(f"  detections {summary['detections']}")
    for concept, n in sorted(summary["detections_by_concept"].items()):
        lines.append(f"    {concept}: {n}")
    ips = summary["throughput"]["images_per_s"]
    lines.append(
        f"  {ips if ips is not None else '-'} images/s; ray init {t['ray_init']} s, "
        f"first shard {t['first_shard']} s, total {t['total']} s"
    )
    out = summary["output"].rstrip("/")
    lines.append(f"  output: {out}/detections (Parquet, class_id=<uuid>/), {out}/images")
    lines.append(f"  summary: {summary.get('summary_uri')}")
    return "\n".join(lines)
