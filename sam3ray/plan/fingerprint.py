"""Labelling fingerprints: which settings a committed shard was labelled with.

Every commit marker records a fingerprint of everything that decides its
shard's labels; on resume a shard whose fingerprint differs is relabelled
(``output.on_settings_change: redo``) or the job refuses to start (``refuse``).

What counts is derived, never listed here: the config fields whose schema marks
them as affecting the labels of the shard's path (``config.label_settings``;
e.g. ``inference.max_imgsz`` affects images only, so changing it relabels no
video), the concepts (class id, name, texts, per-concept ``min_score``), and
the exemplars of the shard's own inputs (so adding boxes for a few images
relabels only their shards). Device, dtype, batch sizes, resources and video
cutting (frame ranges are part of the membership hash) never count.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sam3ray.config.schema import PATHS, JobConfig, label_settings
from sam3ray.core.shards import Shard
from sam3ray.core.types import ConceptSet

#: Bumped when the fingerprint's content changes meaning, so old markers are redone.
FINGERPRINT_VERSION = 2


def digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def job_settings(cfg: JobConfig, concepts: ConceptSet) -> dict[str, Any]:
    """The job-wide part of the fingerprint per path, as plain JSON (also in the summary)."""
    listed = sorted([c.class_id, c.name, sorted(c.texts), c.min_score] for c in concepts.concepts)
    return {
        "version": FINGERPRINT_VERSION,
        "concepts": listed,
        **{path: label_settings(cfg, path) for path in PATHS},
    }


class Fingerprinter:
    """Per-shard fingerprints: its path's settings plus the exemplars of its inputs.

    ``geometric`` is a ``sources.prompts.GeometricPrompts`` or None. Without
    exemplars every shard of a path shares one digest, computed once.
    """

    def __init__(self, cfg: JobConfig, concepts: ConceptSet, geometric: Any = None) -> None:
        self.settings = job_settings(cfg, concepts)
        common = {"version": FINGERPRINT_VERSION, "concepts": self.settings["concepts"]}
        self.digests = {p: digest({**common, "settings": self.settings[p]}) for p in PATHS}
        self._geometric = geometric if geometric is not None and len(geometric) else None

    def __call__(self, shard: Shard) -> str:
        base = self.digests[shard.kind]
        if self._geometric is None:
            return base
        exemplars = []
        for uri, image_id in zip(shard.uris, shard.image_ids, strict=True):
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
        return digest([base, sorted(exemplars)]) if exemplars else base
