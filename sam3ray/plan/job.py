"""Everything the driver decides before Ray starts: validate, list, cut, compare.

A job that will fail on a bad prompt row, a missing checkpoint or an empty
listing fails here, in seconds, naming the file, row and field; no cluster time
is spent. Planning reads (tables, listings, probes, markers) and never writes:
``output.mode: overwrite`` is carried out by the runner, after its resource
checks, so a refused job never deletes anything. The result, :class:`JobPlan`,
is the whole to-do list of a run.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sam3ray.config.checks import validate_paths, where
from sam3ray.config.schema import PATHS, JobConfig, label_fields
from sam3ray.core.errors import SettingsChanged
from sam3ray.core.shards import InputRef, Shard
from sam3ray.core.types import ConceptSet
from sam3ray.output.markers import Marker, scan_markers
from sam3ray.plan.fingerprint import Fingerprinter
from sam3ray.plan.shards import make_shards, orphaned_shard_ids, settings_changed, split_done
from sam3ray.plan.video import cut_videos
from sam3ray.sources.listing import list_inputs
from sam3ray.sources.prompts import (
    GeometricPrompts,
    check_video_exemplars,
    load_concepts,
    load_geometric,
)
from sam3ray.sources.video import collapse_frame_folders, is_video_uri

logger = logging.getLogger(__name__)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class JobPlan:
    """What the driver decided before any Ray work: the job's whole to-do list."""

    run_id: str
    concepts: ConceptSet
    geometric: GeometricPrompts | None
    image_refs: tuple[InputRef, ...]
    video_refs: tuple[InputRef, ...]
    todo: tuple[Shard, ...]  # image and video shards to label now
    skipped: tuple[Shard, ...]  # committed with the same members and settings
    orphans: tuple[str, ...] = ()  # committed shard ids no current shard owns
    markers: Mapping[str, Marker] = field(default_factory=dict)  # found on resume
    relabelled: tuple[str, ...] = ()  # shard ids redone for new settings
    settings: Mapping[str, Any] = field(default_factory=dict)  # fingerprint inputs + digests
    plan_s: float = 0.0

    def shards(self, kind: str) -> tuple[Shard, ...]:
        """The shards of one kind to do now."""
        return tuple(s for s in self.todo if s.kind == kind)

    @property
    def inputs_total(self) -> int:
        """Images plus video shards: the units that get one ``images`` row each."""
        n_video = sum(1 for s in (*self.todo, *self.skipped) if s.kind == "video")
        return len(self.image_refs) + n_video

    @property
    def skipped_inputs(self) -> int:
        return sum(len(s) for s in self.skipped)

    def current_ids(self) -> set[str]:
        """Ids of every input this run lists (images and videos): the ones it labels."""
        return {r.image_id for r in (*self.image_refs, *self.video_refs)}

    def previous_files(self, shard_id: str) -> tuple[str, ...]:
        """The files an earlier commit of this shard wrote (replaced by this run's)."""
        marker = self.markers.get(shard_id)
        return marker.files if marker is not None else ()


def plan_job(cfg: JobConfig) -> JobPlan:
    """Validate everything and list the work, without Ray (errors name file/row/field)."""
    t0 = time.perf_counter()
    validate_paths(cfg)
    source = cfg.input
    concepts = load_concepts(source.location(cfg.prompts.concepts))
    geometric = (
        load_geometric(source.location(cfg.prompts.geometric), concepts)
        if cfg.prompts.geometric
        else None
    )
    refs = collapse_frame_folders(list_inputs(source))
    video_refs = tuple(r for r in refs if is_video_uri(r.uri))
    image_refs = tuple(r for r in refs if not is_video_uri(r.uri))
    if geometric is not None:
        for ref in video_refs:
            check_video_exemplars(geometric, ref.uri, ref.image_id, cfg.video.frame_stride)
    # Overwrite mode plans as if the output were empty; the runner clears it later.
    markers = scan_markers(cfg.output_location) if cfg.output.mode == "resume" else {}
    shards = make_shards(image_refs, cfg.output.shard_size)
    if video_refs:
        shards += cut_videos(video_refs, source, cfg.video)
    fingerprint = Fingerprinter(cfg, concepts, geometric)
    todo, skipped = split_done(shards, markers, cfg.output.retry_errors, fingerprint)
    relabelled = tuple(s.shard_id for s in settings_changed(todo, markers))
    if relabelled:
        _settings_changed(cfg, relabelled, markers)
    orphans = tuple(orphaned_shard_ids(todo + skipped, markers))
    if orphans:
        logger.info(
            "%d committed shards in %s belong to no current shard: the inputs a current "
            "shard owns are dropped from them after this run (output.reconcile)",
            len(orphans),
            cfg.output.uri,
        )
    plan = JobPlan(
        run_id=cfg.run_id or new_run_id(),
        concepts=concepts,
        geometric=geometric,
        image_refs=image_refs,
        video_refs=video_refs,
        todo=tuple(todo),
        skipped=tuple(skipped),
        orphans=orphans,
        markers=markers,
        relabelled=relabelled,
        settings={**fingerprint.settings, "digests": fingerprint.digests},
        plan_s=time.perf_counter() - t0,
    )
    logger.info(
        "%d images + %d videos, %d concepts; %d image shards and %d video shards to do, "
        "%d shards already done",
        len(image_refs),
        len(video_refs),
        len(concepts),
        len(plan.shards("image")),
        len(plan.shards("video")),
        len(skipped),
    )
    return plan


def _settings_changed(cfg: JobConfig, shard_ids: tuple[str, ...], markers: Mapping) -> None:
    """Refuse, or warn before relabelling, shards whose labels came from other settings."""
    runs = sorted({markers[sid].run_id for sid in shard_ids})
    what = (
        f"{len(shard_ids)} shards in {cfg.output.uri} were labelled with other settings "
        f"(concepts, exemplars, or a field marked as deciding labels: "
        f"{', '.join(sorted({f'{s}.{f}' for p in PATHS for s, f in label_fields(p)}))}) "
        f"by run(s) {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}"
    )
    if cfg.output.on_settings_change == "refuse":
        raise SettingsChanged(
            f"{where(cfg)}output.on_settings_change is 'refuse': {what}. Restore those "
            "settings, write to a new output.uri, or set output.on_settings_change=redo"
        )
    logger.warning("%s: relabelling them (output.on_settings_change=redo)", what)
