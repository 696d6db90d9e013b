"""Run a job end to end: plan (no Ray), check, prepare the output, label, reconcile.

Order matters for safety: planning reads only; the resource checks run next;
only then does ``output.mode: overwrite`` clear anything. Once Ray has started,
the run summary is written whatever happens (``status: failed`` and the error
when the job dies), so a scheduler always finds ``runs/<run_id>.json``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sam3ray.config.schema import JobConfig
from sam3ray.core.errors import JobFailed
from sam3ray.output.reconcile import reconcile_orphans
from sam3ray.output.writer import clear_output, write_run_summary
from sam3ray.plan.job import JobPlan, plan_job
from sam3ray.runner import pipelines
from sam3ray.runner.cluster import check_pool_fits, gpus_per_actor, init_ray
from sam3ray.runner.summary import RunTally
from sam3ray.storage.retry import WRITES, retry_transient

logger = logging.getLogger(__name__)


def _prepare_output(cfg: JobConfig) -> None:
    """Overwrite mode's clearing, and the temp files killed writers left (local only)."""
    out = cfg.output_location
    if cfg.output.mode == "overwrite":
        retry_transient(lambda: clear_output(out), f"clearing {out.uri}", WRITES)
    stale = out.remove_stale_temp_files()
    if stale:
        logger.info("removed %d temp files left in %s by killed writers", stale, out.uri)


def _label(cfg: JobConfig, plan: JobPlan, tally: RunTally) -> None:
    if plan.todo or plan.video_refs:  # videos: also to finish a stitch a crash cut short
        tally.ray_init_s = init_ray(cfg)
        check_pool_fits(cfg, len(plan.todo))
        num_gpus = gpus_per_actor(cfg)
        _prepare_output(cfg)
        tally.start_pipeline()
        for kind in ("image", "video"):
            for summary in pipelines.label_pipeline(cfg, plan, kind, num_gpus):
                tally.add(summary)
    if plan.video_refs:
        t0 = time.perf_counter()
        tally.video["stitch"] = pipelines.stitch_videos(cfg, plan.todo + plan.skipped)
        tally.video["stitch_s"] = round(time.perf_counter() - t0, 3)
    # Only now, with every current shard committed, may orphans give up their rows.
    if plan.orphans:
        orphans = {sid: plan.markers[sid] for sid in plan.orphans}
        tally.orphans = reconcile_orphans(cfg.output_location, orphans, plan.current_ids())


def _write_summary(cfg: JobConfig, plan: JobPlan, summary: dict[str, Any]) -> None:
    summary["summary_uri"] = retry_transient(  # idempotent: one object, written whole
        lambda: write_run_summary(cfg.output_location, plan.run_id, summary),
        f"writing the run summary to {cfg.output.uri}",
        WRITES,
    )


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the job and return the run summary (also written to ``runs/<run_id>.json``).

    Raises ``ConfigError`` (nothing started, nothing deleted), ``JobFailed`` (the
    error rate exceeded ``output.max_error_rate``; labels and summary written), or
    whatever broke the job (summary written with ``status: failed``).
    """
    tally = RunTally()
    plan = plan_job(cfg)
    if plan.todo or plan.video_refs or plan.orphans:
        try:
            _label(cfg, plan, tally)
        except BaseException as exc:
            summary = tally.summary(cfg, plan)
            summary.update(status="failed", failure=f"{type(exc).__name__}: {exc}"[:2000])
            try:
                _write_summary(cfg, plan, summary)
            except Exception:
                logger.exception("the run summary of a failed run could not be written")
            raise
    summary = tally.summary(cfg, plan)
    if tally.error_rate > cfg.output.max_error_rate:
        summary["status"] = "failed"
        summary["failure"] = (
            f"error rate {tally.error_rate:.3f} exceeds output.max_error_rate "
            f"{cfg.output.max_error_rate}"
        )
    _write_summary(cfg, plan, summary)
    if summary["status"] == "failed":
        raise JobFailed(summary["failure"], summary)
    return summary
