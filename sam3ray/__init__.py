"""sam3ray: petabyte-scale pre-labelling with SAM 3 on Ray.

The public Python API is small and stable:

- :func:`run_job` / :class:`JobConfig` (+ ``load_config``) — a whole job, as ``sam3ray run``.
- :func:`label` — the same labelling as one operator of your own Ray Data pipeline
  (a dataset of URIs, image bytes or arrays in, detection rows out), configured by
  the job's sections (:class:`ModelConfig`, :class:`InferenceConfig`, :class:`ResourcesConfig`).
- :func:`load_sam3_image_model` — the official ``sam3`` image model (a ``Sam3Image``)
  with weights from a local path, an object-store URI or the hub id ``facebook/sam3``.
- :class:`Sam3Engine` — concept-grouped batched inference over that model, configured
  by the job's :class:`InferenceConfig` section.
- :class:`Detection`, :class:`Concept`, :class:`ConceptSet`, :class:`Exemplar` — its
  inputs and outputs.
- :func:`make_tiny_checkpoint` — a tiny random-weight SAM 3 for tests and demos.

Heavy modules (torch, sam3, ray) load on first use, so ``import sam3ray`` stays cheap
for drivers and CLIs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sam3ray.config import (
    InferenceConfig,
    JobConfig,
    ModelConfig,
    ResourcesConfig,
    load_config,
)
from sam3ray.core.types import Concept, ConceptSet, Detection, Exemplar

__version__ = "0.1.0"

__all__ = [
    "Concept",
    "ConceptSet",
    "Detection",
    "Exemplar",
    "InferenceConfig",
    "JobConfig",
    "ModelConfig",
    "ResourcesConfig",
    "Sam3Engine",
    "label",
    "load_config",
    "load_sam3_image_model",
    "make_tiny_checkpoint",
    "run_job",
]

if TYPE_CHECKING:  # pragma: no cover
    from sam3ray.model.engine import Sam3Engine
    from sam3ray.model.tiny import make_tiny_checkpoint
    from sam3ray.runner.job import run_job
    from sam3ray.runner.operator import label

_LAZY = {
    "Sam3Engine": "sam3ray.model.engine",
    "make_tiny_checkpoint": "sam3ray.model.tiny",
    "run_job": "sam3ray.runner.job",
    "label": "sam3ray.runner.operator",
}


def load_sam3_image_model(
    checkpoint: str,
    device: str = "cpu",
    *,
    cache_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """The official ``sam3`` ``Sam3Image`` module, eval mode, weights loaded, on ``device``.

    The architecture (released or tiny) is rebuilt from the checkpoint itself.
    Raises ``sam3ray.model.loader.CheckpointError`` for a missing, unreadable
    or mismatched checkpoint.
    """
    from sam3ray.model.device import resolve_device
    from sam3ray.model.loader import load_checkpoint_into_new_model, resolve_checkpoint
    from sam3ray.storage.location import Location

    path = resolve_checkpoint(Location(checkpoint, storage_options or {}), cache_dir=cache_dir)
    model, _ = load_checkpoint_into_new_model(path)
    return model.to(resolve_device(device))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sam3ray' has no attribute {name!r}")
