"""What the two model stages share: their config sections, resources, and the model load.

``SegmentStage`` (images) and ``TrackStage`` (videos) differ only in the model they
load and what they do with a task; the sections they take, the actor resources they
declare, the one-load-per-actor rule and the ``WorkerInfo`` they stamp on every
result are the same, so they live here once.
"""

from __future__ import annotations

import logging
import os
import time

from sam3ray.config.schema import InferenceConfig, ModelConfig, ResourcesConfig
from sam3ray.core.types import ConceptSet
from sam3ray.sources.prompts import GeometricPrompts
from sam3ray.stages.base import Resources
from sam3ray.stages.metrics import Metrics, NullMetrics
from sam3ray.stages.tasks import WorkerInfo
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)


class ModelStage:
    """A stage that holds a SAM 3 model: actor resources, ``setup()`` loads it once."""

    name = "model"

    def __init__(
        self,
        model: ModelConfig,
        inference: InferenceConfig,
        resources: ResourcesConfig,
        concepts: ConceptSet,
        *,
        run_id: str,
        checkpoint: Location | None = None,
        geometric: GeometricPrompts | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.inference = inference
        self.concepts = concepts
        self.geometric = geometric
        self.run_id = run_id
        self.checkpoint = checkpoint
        self.metrics = metrics or NullMetrics()
        self.resources = Resources(  # the actor also reads and decodes its inputs
            cpus=resources.cpus_per_actor + resources.decode_cpus,
            gpus=resources.gpus_per_actor,
            actor=True,
            actors=resources.actors,
        )
        self.worker: WorkerInfo | None = None

    def _load(self) -> str:
        """Load the model (heavy imports happen here); return its model id."""
        raise NotImplementedError

    def setup(self) -> None:
        if self.worker is not None:
            return
        t0 = time.perf_counter()
        model_id = self._load()
        self.worker = WorkerInfo(os.getpid(), time.time(), time.perf_counter() - t0, model_id)
        logger.info("%s: SAM 3 loaded in %.1f s (%s)", self.name, self.worker.setup_s, model_id)
