"""The run summary: what ``runs/<run_id>.json`` records (counts, timings, versions).

The driver folds one small :class:`~sam3ray.stages.tasks.CommitSummary` per
shard into a :class:`RunTally`, so its memory does not grow with detections.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from sam3ray.config.checks import redact
from sam3ray.config.schema import JobConfig
from sam3ray.plan.job import JobPlan
from sam3ray.stages.tasks import CommitSummary

logger = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sam3ray", "sam3", "torch", "ray", "pyarrow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


#: Seconds between two progress lines in the log.
PROGRESS_EVERY_S = 30.0


@dataclass
class RunTally:
    """Counts of a run so far; :meth:`summary` renders them, :meth:`add` logs progress."""

    t_start: float = field(default_factory=time.perf_counter)
    ray_init_s: float = 0.0
    t_pipeline: float | None = None
    first_result_s: float = 0.0
    to_do: int = 0
    totals: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    per_concept: Counter = field(default_factory=Counter)
    loads: dict[int, set[float]] = field(default_factory=lambda: defaultdict(set))
    first_finish: tuple[float, int] | None = None
    last_finish: float = 0.0
    last_progress: float = 0.0
    video: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    def expect(self, inputs: int) -> None:
        """How many inputs this run has to (re)label: progress is counted against it."""
        self.to_do = inputs

    def start_pipeline(self) -> None:
        self.t_pipeline = self.last_progress = time.perf_counter()

    def add(self, s: CommitSummary) -> None:
        if not self.first_result_s and self.t_pipeline is not None:
            self.first_result_s = time.perf_counter() - self.t_pipeline
        # steady-state rate from the actors' finish times: inputs after the first
        # finished shard ÷ (last finish − first finish); excludes start-up fairly
        if self.first_finish is None or s.finished_at < self.first_finish[0]:
            self.first_finish = (s.finished_at, s.n_inputs)
        self.last_finish = max(self.last_finish, s.finished_at)
        for key in ("n_inputs", "n_ok", "n_error", "n_detections"):
            self.totals[key] += getattr(s, key)
        self.totals["shards"] += 1
        self.totals[f"{s.kind}_shards"] += 1
        self.reasons.update(s.errors_by_reason)
        self.per_concept.update(s.detections_by_concept)
        if s.worker is not None:
            self.loads[s.worker.pid].add(s.worker.setup_at)
        now = time.perf_counter()
        if now - self.last_progress >= PROGRESS_EVERY_S:
            self.last_progress = now
            p = self.progress()
            eta = f"{p['eta_s'] / 60:.1f} min" if p["eta_s"] is not None else "-"
            logger.info(
                "progress: %d of %d inputs (%.1f%%), %.2f inputs/s, ETA %s",
                p["inputs_done"],
                p["inputs_to_do"],
                100 * p["inputs_done"] / max(1, p["inputs_to_do"]),
                p["inputs_per_s"] or 0.0,
                eta,
            )

    def progress(self) -> dict[str, Any]:
        """Inputs done / to do, the rate since labelling started, and the time left."""
        done = self.totals["n_inputs"]
        elapsed = time.perf_counter() - self.t_pipeline if self.t_pipeline is not None else 0.0
        rate = done / elapsed if elapsed > 0 and done else None
        left = max(0, self.to_do - done)
        return {
            "inputs_done": done,
            "inputs_to_do": self.to_do,
            "inputs_per_s": round(rate, 3) if rate else None,
            "eta_s": round(left / rate, 1) if rate else None,
        }

    @property
    def error_rate(self) -> float:
        n = self.totals["n_inputs"]
        return self.totals["n_error"] / n if n else 0.0

    def summary(self, cfg: JobConfig, plan: JobPlan) -> dict[str, Any]:
        now = time.perf_counter()
        pipe_s = now - self.t_pipeline if self.t_pipeline is not None else 0.0
        steady_s = self.last_finish - self.first_finish[0] if self.first_finish else 0.0
        steady_inputs = self.totals["n_inputs"] - (self.first_finish[1] if self.first_finish else 0)
        stats = plan.stats
        return {
            "run_id": plan.run_id,
            "output": cfg.output.uri,
            "status": "succeeded",
            "inputs_total": stats.listed,
            "inputs_processed": self.totals["n_inputs"],
            "inputs_skipped_done": stats.done,
            "ok": self.totals["n_ok"],
            "errors": self.totals["n_error"],
            "errors_by_reason": dict(self.reasons),
            "detections": self.totals["n_detections"],
            "detections_by_concept": dict(self.per_concept),
            "plan": {"engine": plan.engine, **stats.to_json(), "recovered_runs": plan.recovered},
            "shards": {
                "done_now": self.totals["shards"],
                "new": stats.fresh_shards,
                "relabelled": stats.relabel_shards,
                "dropped": stats.drop_shards,
            },
            "progress": self.progress(),
            "state": self.state,
            "labelling_settings": dict(plan.prepared.prints.settings),
            "videos": {
                "new": stats.new_videos,
                "shards_done_now": self.totals["video_shards"],
                **self.video,
            },
            "actors": {
                "count": len(self.loads),
                "model_loads_per_actor": sorted(len(v) for v in self.loads.values()),
            },
            "timing_s": {
                "plan": round(plan.plan_s, 3),
                "ray_init": round(self.ray_init_s, 3),
                "first_shard": round(self.first_result_s, 3),
                "pipeline": round(pipe_s, 3),
                "total": round(now - self.t_start, 3),
            },
            "throughput": {
                "images_per_s": (
                    round(self.totals["n_inputs"] / pipe_s, 3) if pipe_s > 0 else None
                ),
                "images_per_s_after_first_shard": (
                    round(steady_inputs / steady_s, 3) if steady_s > 0 else None
                ),
            },
            "versions": versions(),
            "config": redact(cfg),
        }
