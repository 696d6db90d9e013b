"""Labelling fingerprints, per concept: which settings a shard's labels of a concept came from.

Each shard records, for every concept it holds, a fingerprint of everything that
decided those labels. On the next run a concept whose fingerprint changed is
relabelled alone (or the job refuses: ``output.on_settings_change: refuse``), a
new concept is labelled alone, a removed one is dropped, and the rest is left
as it is. So adding one class to a ten-class ontology labels one class.

What counts is derived, never listed here: the config fields whose schema marks
them as affecting the labels of the shard's path (``config.label_settings``;
``inference.max_imgsz`` affects images only), the concept itself (class id,
name, texts, ``min_score``), and the exemplars of that concept on the shard's
own inputs (so adding boxes for a few images relabels one concept of their
shards). Device, dtype, batch sizes, resources and video cutting never count.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sam3ray.config.schema import PATHS, JobConfig, label_settings
from sam3ray.core.shards import Shard
from sam3ray.core.types import ConceptSet

#: Bumped when the fingerprint's content changes meaning, so old labels are redone.
FINGERPRINT_VERSION = 4  # 4: max_det per concept


def digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def job_settings(cfg: JobConfig, concepts: ConceptSet) -> dict[str, Any]:
    """What decides labels in this job, as plain JSON (also written to the run summary)."""
    listed = sorted([c.class_id, c.name, sorted(c.texts), c.min_score] for c in concepts.concepts)
    return {
        "version": FINGERPRINT_VERSION,
        "concepts": listed,
        **{path: label_settings(cfg, path) for path in PATHS},
    }


class ConceptPrints:
    """Fingerprints per path and concept, and per shard with its exemplars folded in.

    Small and picklable: planning tasks on the cluster use it to compare every
    committed shard's fingerprints with the job's.
    """

    def __init__(self, cfg: JobConfig, concepts: ConceptSet, geometric: Any = None) -> None:
        self.settings = job_settings(cfg, concepts)
        self.class_ids = tuple(c.class_id for c in concepts)
        self.by_path: dict[str, dict[str, str]] = {}
        for path in PATHS:
            base = digest({"version": FINGERPRINT_VERSION, "settings": self.settings[path]})
            self.by_path[path] = {
                c.class_id: digest([base, c.class_id, c.name, sorted(c.texts), c.min_score])
                for c in concepts
            }
        self._geometric = geometric if geometric is not None and len(geometric) else None

    def for_shard(self, shard: Shard) -> dict[str, str]:
        """Every concept's fingerprint for this shard (exemplars of its inputs included)."""
        prints = dict(self.by_path[shard.kind])
        if self._geometric is None:
            return prints
        found: dict[str, list[Any]] = {}
        for uri, image_id in zip(shard.uris, shard.image_ids, strict=True):
            for cid, items in self._geometric.for_image(uri, image_id).items():
                found.setdefault(cid, []).extend(
                    [image_id, e.kind, list(e.coords), e.positive, e.frame_index] for e in items
                )
        for cid, items in found.items():
            if cid in prints:
                prints[cid] = digest([prints[cid], sorted(items)])
        return prints
