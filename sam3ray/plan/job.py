"""Before any work: validate the job, and decide what a plan may ask (refusals).

:func:`prepare` runs on the driver before Ray starts: a bad prompt row, a
missing checkpoint or an impossible exemplar fails here, in seconds, naming the
file, row and field. The plan itself (what to label) is made by an engine that
fits the job's size (``plan.local`` in this process, ``runner.planning`` on the
cluster); both return a :class:`JobPlan`, which holds counts, never the list.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sam3ray.config.checks import validate_paths, where
from sam3ray.config.schema import JobConfig
from sam3ray.core.errors import ConfigError, SettingsChanged
from sam3ray.core.types import ConceptSet
from sam3ray.output.layout import MARKERS_DIR, STATE_DIR
from sam3ray.plan.buckets import PlanStats
from sam3ray.plan.fingerprint import ConceptPrints
from sam3ray.sources.prompts import (
    GeometricPrompts,
    check_video_exemplars,
    load_concepts,
    load_geometric,
)
from sam3ray.sources.video import is_video_uri


def new_run_id() -> str:
    """Run ids sort by start time (the latest shards row of a shard wins): microseconds,
    so two runs started in the same second still sort in the order they started."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Prepared:
    """What a validated job knows before listing anything."""

    run_id: str
    concepts: ConceptSet
    geometric: GeometricPrompts | None
    prints: ConceptPrints


@dataclass
class JobPlan:
    """A run's plan, as the driver holds it: counts (the tasks are in ``_state/plans``)."""

    prepared: Prepared
    stats: PlanStats
    engine: str  # "local" | "ray"
    recovered: dict[str, Any] = field(default_factory=dict)  # dead runs folded in
    plan_s: float = 0.0

    @property
    def run_id(self) -> str:
        return self.prepared.run_id


def prepare(cfg: JobConfig) -> Prepared:
    """Validate everything that can be validated without listing (no Ray)."""
    validate_paths(cfg)
    refuse_legacy_output(cfg)
    source = cfg.input
    concepts = load_concepts(source.location(cfg.prompts.concepts))
    geometric = (
        load_geometric(source.location(cfg.prompts.geometric), concepts)
        if cfg.prompts.geometric
        else None
    )
    if geometric is not None:
        for key in geometric.image_keys():
            if is_video_uri(key):
                check_video_exemplars(geometric, key, "", cfg.video.frame_stride)
    return Prepared(
        run_id=cfg.run_id or new_run_id(),
        concepts=concepts,
        geometric=geometric,
        prints=ConceptPrints(cfg, concepts, geometric),
    )


def refuse_legacy_output(cfg: JobConfig) -> None:
    """An output written before the consolidated state (markers, no ``_state/``) cannot
    be resumed: planning would not see its labels and would label every input again
    into new shards, next to the old files. Two small existence checks, no full listing."""
    if cfg.output.mode == "overwrite":
        return
    out = cfg.output_location
    if out.child(STATE_DIR).exists() or not out.child(MARKERS_DIR).exists():
        return
    raise ConfigError(
        f"{where(cfg)}output.uri: {cfg.output.uri} was written by an earlier sam3ray "
        "(commit markers without _state/), whose shards this version cannot resume: label "
        "into a new output, or set output.mode: overwrite to replace it"
    )


def refuse_changes(cfg: JobConfig, stats: PlanStats) -> None:
    """``output.on_settings_change: refuse``: stop before labelling anything when the plan
    would change or drop labels made with other settings."""
    if cfg.output.on_settings_change != "refuse" or not stats.changed_by:
        return
    runs = sorted(stats.changed_by)
    changed = {
        cid: {k: n for k, n in kinds.items() if k in ("edited", "removed")}
        for cid, kinds in stats.by_concept.items()
    }
    changed = {cid: kinds for cid, kinds in changed.items() if kinds}
    raise SettingsChanged(
        f"{where(cfg)}output.on_settings_change is 'refuse': labels in {cfg.output.uri} made "
        f"by run(s) {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''} would change "
        f"(concept -> inputs: {changed}; concepts, exemplars, or a field marked as deciding "
        "labels changed). Restore those settings, write to a new output.uri, or set "
        "output.on_settings_change=redo"
    )
