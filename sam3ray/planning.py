"""Everything the driver decides before Ray starts: validate, list, plan shards.

A job that will fail on a bad prompt row, a missing checkpoint or an empty
listing fails here, in seconds, naming the file, row and field; no cluster time
is spent. The result, :class:`JobPlan`, is the whole to-do list of a run.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sam3ray.config import ConfigError, JobConfig
from sam3ray.config_checks import validate_paths
from sam3ray.fingerprint import Fingerprinter
from sam3ray.inputs import list_inputs, retry_transient
from sam3ray.output import clear_output, scan_markers
from sam3ray.output_io import filesystem, remove_stale_temp_files
from sam3ray.prompts import load_concepts, load_geometric
from sam3ray.shards import orphaned_shard_ids, plan_shards, settings_changed

logger = logging.getLogger(__name__)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass
class JobPlan:
    """What the driver decided before any Ray work: the job's whole to-do list."""

    run_id: str
    concepts: Any
    geometric: Any
    image_refs: list
    todo: list
    skipped: list
    video_refs: list = field(default_factory=list)
    video_plan: tuple[list, list] = ([], [])
    orphans: list = field(default_factory=list)
    markers: dict = field(default_factory=dict)  # shard_id -> Marker found on resume
    relabelled: list = field(default_factory=list)  # shard ids redone for new settings
    settings: dict = field(default_factory=dict)  # fingerprint.job_settings + its digest
    plan_s: float = 0.0

    @property
    def inputs_total(self) -> int:
        """Images plus video shards: the units that get one ``images`` row each."""
        return len(self.image_refs) + len(self.video_plan[0]) + len(self.video_plan[1])

    def current_ids(self) -> set[str]:
        """Ids of every input this run lists (images and videos): the ones it labels."""
        return {r.image_id for r in self.image_refs} | {r.image_id for r in self.video_refs}

    @property
    def skipped_inputs(self) -> int:
        return sum(len(s) for s in self.skipped) + len(self.video_plan[1])


def plan_job(cfg: JobConfig) -> JobPlan:
    """Validate everything and list the work, without Ray (errors name file/row/field)."""
    from sam3ray.video_decode import collapse_frame_folders, is_video_uri

    t0 = time.perf_counter()
    out_uri, out_opts = cfg.output.uri, cfg.output_storage_options
    validate_paths(cfg)
    concepts = load_concepts(cfg.prompts.concepts, cfg.input.storage_options)
    geometric = (
        load_geometric(cfg.prompts.geometric, concepts, cfg.input.storage_options)
        if cfg.prompts.geometric
        else None
    )
    refs = collapse_frame_folders(list_inputs(cfg.input))
    video_refs = [r for r in refs if is_video_uri(r.uri)]
    image_refs = [r for r in refs if not is_video_uri(r.uri)]
    if cfg.output.mode == "overwrite":
        retry_transient(lambda: clear_output(out_uri, out_opts), f"clearing {out_uri}")
    stale = remove_stale_temp_files(*filesystem(out_uri, out_opts))
    if stale:
        logger.info("removed %d temp files left in %s by killed writers", stale, out_uri)
    markers = (
        retry_transient(lambda: scan_markers(out_uri, out_opts), f"listing markers in {out_uri}")
        if cfg.output.mode == "resume"
        else {}
    )
    prints = Fingerprinter(cfg, concepts, geometric)
    todo, skipped = plan_shards(
        image_refs,
        cfg.output.shard_size,
        markers,
        cfg.output.retry_errors,
        lambda s: prints.for_inputs(zip(s.uris, s.image_ids)),
    )
    video_plan: tuple[list, list] = ([], [])
    if video_refs:
        from sam3ray.pipeline_video import plan_video

        video_plan = plan_video(cfg, video_refs, markers, prints)
    relabelled = [s.shard_id for s in settings_changed(todo + video_plan[0], markers)]
    if relabelled:
        _settings_changed(cfg, relabelled, markers)
    video_ids = {s.shard_id for s in video_plan[0] + video_plan[1]}
    orphans = [o for o in orphaned_shard_ids(todo + skipped, markers) if o not in video_ids]
    if orphans:
        logger.info(
            "%d committed shards in %s belong to no current shard: the inputs a current "
            "shard owns are dropped from them after this run (sam3ray.orphans)",
            len(orphans),
            out_uri,
        )
    plan = JobPlan(
        run_id=cfg.run_id or new_run_id(),
        concepts=concepts,
        geometric=geometric,
        image_refs=image_refs,
        todo=todo,
        skipped=skipped,
        video_refs=video_refs,
        video_plan=video_plan,
        orphans=orphans,
        markers=markers,
        relabelled=relabelled,
        settings={**prints.settings, "digest": prints.job_digest},
        plan_s=time.perf_counter() - t0,
    )
    logger.info(
        "%d images + %d videos, %d concepts; %d image shards and %d video shards to do, "
        "%d + %d already done",
        len(image_refs),
        len(video_refs),
        len(concepts),
        len(todo),
        len(video_plan[0]),
        len(skipped),
        len(video_plan[1]),
    )
    return plan


def _settings_changed(cfg: JobConfig, shard_ids: list[str], markers: dict) -> None:
    """Refuse, or warn before relabelling, shards whose labels came from other settings."""
    runs = sorted({markers[sid].run_id for sid in shard_ids})
    what = (
        f"{len(shard_ids)} shards in {cfg.output.uri} were labelled with other settings "
        f"(concepts, exemplars, model.checkpoint or inference.conf/iou/nms/max_det/"
        f"max_imgsz) by run(s) {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}"
    )
    if cfg.output.on_settings_change == "refuse":
        raise ConfigError(
            f"output.on_settings_change is 'refuse': {what}. Restore those settings, "
            "write to a new output.uri, or set output.on_settings_change=redo to relabel them"
        )
    logger.warning("%s: relabelling them (output.on_settings_change=redo)", what)
