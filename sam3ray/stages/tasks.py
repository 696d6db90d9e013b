"""The typed hand-offs between stages (frozen values; the runner moves them whole).

    ShardTask ──segment (reads + decodes images)──► ShardResult ──commit──► CommitSummary
    ShardTask ──track (decodes video frames)──────► ShardResult ──commit──► CommitSummary

Images and videos share every type; a video result also carries its staging
table (all decoded frames with local track ids) for the stitch pass. No
hand-off carries pixels: a task is a shard's URIs (a few KB), and the model
actors read and decode their inputs themselves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from sam3ray.core.shards import ShardTask


@dataclass(frozen=True)
class WorkerInfo:
    """Which process produced a result, and when it loaded its model."""

    pid: int
    setup_at: float  # wall clock of the model load: one value per model load
    setup_s: float
    model: str


@dataclass(frozen=True)
class ShardResult:
    """A labelled shard, ready to commit: detection rows and one images row per input."""

    task: ShardTask
    detections: pa.Table
    images: pa.Table
    worker: WorkerInfo
    finished_at: float
    staging: pa.Table | None = None  # video only: every decoded frame, local track ids


@dataclass(frozen=True)
class CommitSummary:
    """What the driver keeps per committed shard (a few hundred bytes)."""

    shard_id: str
    kind: str
    n_inputs: int
    n_ok: int
    n_error: int
    n_detections: int
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    detections_by_concept: dict[str, int] = field(default_factory=dict)
    worker: WorkerInfo | None = None
    finished_at: float = 0.0

    @classmethod
    def of(cls, result: ShardResult) -> CommitSummary:
        """What this run did to the shard: its inputs (re)labelled now, their outcomes, the
        detections it produced (a relabel of some concepts counts only those)."""
        img, det = result.images, result.detections
        statuses = Counter(img.column("status").to_pylist())
        return cls(
            shard_id=result.task.shard_id,
            kind=result.task.shard.kind,
            n_inputs=img.num_rows,
            n_ok=statuses.get("ok", 0),
            n_error=statuses.get("error", 0),
            n_detections=det.num_rows,
            errors_by_reason=dict(Counter(r for r in img.column("error_reason").to_pylist() if r)),
            detections_by_concept=dict(Counter(det.column("concept").to_pylist())),
            worker=result.worker,
            finished_at=result.finished_at,
        )
