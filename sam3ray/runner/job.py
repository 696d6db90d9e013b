"""Run a job end to end: validate (no Ray), plan, check, label, consolidate.

Order matters for safety and cost:

1. ``plan.job.prepare`` validates config, prompt tables and checkpoint: a bad
   job exits 2 before Ray starts.
2. Runs that died are folded into the state (their commits kept, their
   half-written new shards removed), then the plan is made: in this process for
   small jobs, on the cluster past ``plan.local_max_inputs``. A plan that would
   change labels made with other settings stops here under
   ``on_settings_change: refuse`` (exit 4), before anything is written.
   A nightly run over a labelled lake ends here: nothing to do, no actor started.
3. Resource checks, then (``output.mode: overwrite``) clearing, then labelling:
   the tasks stream from the plan through the stages.
4. The run's commits are consolidated into the state (the next run's done-set).

Once labelling has started, the run summary is written whatever happens
(``status: failed`` and the error when the job dies).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sam3ray.config.schema import JobConfig
from sam3ray.core.errors import ConfigError, JobFailed
from sam3ray.output.state import plan_dir, run_record, runs_with_plans, unfinished_runs
from sam3ray.output.writer import clear_output, write_run_summary
from sam3ray.plan.job import JobPlan, Prepared, prepare, refuse_changes
from sam3ray.plan.local import TooLarge, consolidate_locally, plan_locally, write_plan
from sam3ray.runner import pipelines
from sam3ray.runner.cluster import check_pool_fits, gpus_per_actor, init_ray
from sam3ray.runner.planning import consolidate_on_ray, plan_on_ray
from sam3ray.runner.summary import RunTally
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)


def consolidate(cfg: JobConfig, run_id: str, tally: RunTally | None = None) -> dict[str, Any]:
    """Fold a run's commits into the state, here or on the cluster by its size."""
    output = cfg.output_location
    if cfg.plan.engine != "ray":
        try:
            return consolidate_locally(output, run_id, cfg.plan.local_max_inputs)
        except TooLarge:
            if cfg.plan.engine == "local":
                raise
    if tally is not None and not tally.ray_init_s:
        tally.ray_init_s = init_ray(cfg)
    else:
        init_ray(cfg)
    return consolidate_on_ray(output, run_id)


def make_plan(
    cfg: JobConfig,
    prepared: Prepared,
    *,
    write: bool = True,
    refuse: bool = True,
    tally: RunTally | None = None,
) -> JobPlan:
    """Recover dead runs, then plan this one (in this process or on the cluster).

    ``write=False`` is a dry run (``sam3ray plan``): nothing is written, and dead
    runs are reported, not folded in. ``refuse=False`` returns a plan that
    ``on_settings_change: refuse`` would stop (the caller reports it).
    """
    t0 = time.perf_counter()
    output = cfg.output_location
    recovered = {}
    if cfg.output.mode == "resume":
        for dead in unfinished_runs(output, before=prepared.run_id):
            if not write:
                recovered[dead] = {"status": "unfinished: the next run folds it in"}
                continue
            logger.warning("run %s died before it consolidated its state: folding it in", dead)
            recovered[dead] = consolidate(cfg, dead, tally)
    engine = "local"
    try:
        if cfg.plan.engine == "ray":
            raise TooLarge("plan.engine is ray")
        tasks, stats = plan_locally(cfg, prepared)
        if refuse:
            refuse_changes(cfg, stats)
        if write and tasks:
            write_plan(output, prepared.run_id, tasks)
    except TooLarge as why:
        if cfg.plan.engine == "local":
            raise ConfigError(
                f"plan.engine is local but the job lists {why}: set plan.engine=auto or ray"
            ) from None
        engine = "ray"
        logger.info("planning on the cluster (%s)", why)
        ray_s = init_ray(cfg)
        if tally is not None:
            tally.ray_init_s = ray_s
        stats = plan_on_ray(cfg, prepared, write=write)
        try:
            if refuse:
                refuse_changes(cfg, stats)
        except ConfigError:
            output.child(plan_dir(prepared.run_id)).delete_tree()  # refused: no trace left
            raise
    plan = JobPlan(prepared, stats, engine, recovered, time.perf_counter() - t0)
    logger.info(
        "plan (%s): %d inputs listed, %d done, %d new in %d shards; %d shards to relabel, "
        "%d to drop concepts from",
        engine,
        stats.listed,
        stats.done,
        stats.new_images + stats.new_videos,
        stats.fresh_shards,
        stats.relabel_shards,
        stats.drop_shards,
    )
    return plan


def _stitch_iou_changed(cfg: JobConfig, output: Location, run_id: str) -> bool:
    """Whether the last consolidated run stitched videos with another ``stitch_iou``."""
    for previous in reversed(runs_with_plans(output)):
        record = run_record(output, previous)
        if previous != run_id and record and "stitch_iou" in record:
            return record["stitch_iou"] != cfg.video.stitch_iou
    return False


def _label(cfg: JobConfig, plan: JobPlan, tally: RunTally) -> None:
    output = cfg.output_location
    tally.expect(plan.stats.inputs_to_label)
    if plan.stats.tasks:
        if not tally.ray_init_s:
            tally.ray_init_s = init_ray(cfg)
        check_pool_fits(cfg, plan.stats.tasks)
        num_gpus = gpus_per_actor(cfg)
        if cfg.output.mode == "overwrite":
            clear_output(output, keep=plan_dir(plan.run_id))
        stale = output.remove_stale_temp_files()
        if stale:
            logger.info("removed %d temp files left in %s by killed writers", stale, output.uri)
        tally.start_pipeline()
        for kind in ("image", "video"):
            for summary in pipelines.label_pipeline(cfg, plan, kind, num_gpus):
                tally.add(summary)
    restitch = _stitch_iou_changed(cfg, output, plan.run_id)
    if plan.stats.kinds.get("video") or restitch:
        if not tally.ray_init_s:
            tally.ray_init_s = init_ray(cfg)
        t0 = time.perf_counter()
        tally.video["stitch"] = pipelines.stitch_videos(cfg, plan, restitch)
        tally.video["stitch_s"] = round(time.perf_counter() - t0, 3)
    if plan.stats.tasks:
        tally.state = consolidate(cfg, plan.run_id, tally)
        _record_stitch_iou(cfg, plan.run_id)


def _record_stitch_iou(cfg: JobConfig, run_id: str) -> None:
    from sam3ray.output.state import write_run_record

    output = cfg.output_location
    record = run_record(output, run_id) or {"run_id": run_id}
    write_run_record(output, run_id, {**record, "stitch_iou": cfg.video.stitch_iou})


def _write_summary(cfg: JobConfig, plan_run_id: str, summary: dict[str, Any]) -> None:
    # One object written whole: Location.write_bytes retries it.
    summary["summary_uri"] = write_run_summary(cfg.output_location, plan_run_id, summary)


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the job and return the run summary (also written to ``runs/<run_id>.json``).

    Raises ``ConfigError`` (nothing labelled, nothing deleted; ``SettingsChanged``
    for a refused relabel), ``JobFailed`` (the error rate exceeded
    ``output.max_error_rate``; labels and summary written), or whatever broke the
    job (summary written with ``status: failed``).
    """
    tally = RunTally()
    prepared = prepare(cfg)
    plan = make_plan(cfg, prepared, tally=tally)
    try:
        _label(cfg, plan, tally)
    except BaseException as exc:
        summary = tally.summary(cfg, plan)
        summary.update(status="failed", failure=f"{type(exc).__name__}: {exc}"[:2000])
        try:
            _write_summary(cfg, plan.run_id, summary)
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
    _write_summary(cfg, plan.run_id, summary)
    if summary["status"] == "failed":
        raise JobFailed(summary["failure"], summary)
    return summary
