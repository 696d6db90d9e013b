"""Labelling fingerprints: which settings a committed shard was labelled with.

Resume used to compare only a shard's membership, so a rerun after editing the
concept table or ``inference.conf`` silently kept the old labels next to new
ones. Every commit marker now records a fingerprint of everything that decides
a shard's labels; on resume a shard whose fingerprint differs is relabelled
(``output.on_settings_change: redo``) or the job refuses to start (``refuse``).

What counts: the concepts (class id, name, texts, per-concept ``min_score``),
the checkpoint URI, the result-changing ``inference.*`` fields, and the
exemplars of the shard's own inputs (so adding boxes for a few images relabels
only their shards). What does not: device, dtype, ``torch.compile``, batch
sizes, resources, video cutting (frame ranges are part of the membership hash).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sam3ray.config import JobConfig
from sam3ray.types import ConceptSet

#: Bumped when the fingerprint's content changes meaning, so old markers are redone.
FINGERPRINT_VERSION = 1
#: ``inference.*`` fields that change which labels are written (the rest is speed).
RESULT_FIELDS = ("conf", "iou", "nms", "max_det", "max_imgsz")


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def job_settings(cfg: JobConfig, concepts: ConceptSet) -> dict[str, Any]:
    """The job-wide part of the fingerprint, as plain JSON (also written to the summary)."""
    return {
        "version": FINGERPRINT_VERSION,
        "checkpoint": cfg.model.checkpoint,
        "inference": {k: getattr(cfg.inference, k) for k in RESULT_FIELDS},
        "concepts": sorted(
            [c.class_id, c.name, sorted(c.texts), c.min_score] for c in concepts.concepts
        ),
    }


class Fingerprinter:
    """Per-shard fingerprints: the job's settings plus the exemplars of its inputs.

    ``geometric`` is a ``prompts.GeometricPrompts`` or None. Without exemplars
    every shard shares the job-wide digest, computed once.
    """

    def __init__(self, cfg: JobConfig, concepts: ConceptSet, geometric: Any = None) -> None:
        self.settings = job_settings(cfg, concepts)
        self.job_digest = _digest(self.settings)
        self._geometric = geometric if geometric is not None and len(geometric) else None

    def for_inputs(self, inputs: Iterable[tuple[str, str]]) -> str:
        """Fingerprint of a shard whose inputs are ``(uri, image_id)`` pairs (videos:
        ``(uri, video_id)``)."""
        if self._geometric is None:
            return self.job_digest
        exemplars = []
        for uri, image_id in inputs:
            found = self._geometric.for_image(uri, image_id)
            if found:
                exemplars.append(
                    [
                        image_id,
                        sorted(
                            [cid, e.kind, list(e.coords), e.positive, e.frame_index]
                            for cid, items in found.items()
                            for e in items
                        ),
                    ]
                )
        if not exemplars:
            return self.job_digest
        return _digest([self.job_digest, sorted(exemplars)])
