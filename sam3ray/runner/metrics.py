"""``RayMetrics``: the stages' metrics protocol exported through ``ray.util.metrics``.

Each node's metrics agent serves them to Prometheus/Grafana. Ray prefixes custom
metrics with ``ray_``, so Prometheus sees ``ray_sam3ray_images_total{status,reason}``,
``ray_sam3ray_detections_total{concept}`` and
``ray_sam3ray_inference_latency_ms_bucket{le}`` (plus ``_sum``/``_count``). The
metric objects are made in the recording process (the actor), so a
``RayMetrics`` built on the driver pickles into a stage without handles.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

#: Histogram bucket upper bounds in ms. Per-image latency spans the tiny model on
#: CPU (tens of ms) to full SAM 3 with many concepts on a busy GPU (seconds).
LATENCY_BOUNDARIES_MS: tuple[float, ...] = (
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
)  # fmt: skip

IMAGES_METRIC = "sam3ray_images_total"
DETECTIONS_METRIC = "sam3ray_detections_total"
LATENCY_METRIC = "sam3ray_inference_latency_ms"
_NO_REASON = "none"  # a label value must be a string; "" reads badly in Grafana


class RayMetrics:
    """``ray.util.metrics`` behind the :class:`Metrics` protocol.

    The metric objects are created on first use in the recording process (Ray
    metrics belong to the worker that made them) and are dropped on pickling.
    ``tags`` are constant labels added to every series (e.g. ``{"run_id": ...}``);
    keep them low-cardinality. A metrics failure (no Ray in this process, a bad
    label) is logged once and turns this instance off: labels must never cost a shard.
    """

    def __init__(self, tags: Mapping[str, str] | None = None) -> None:
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._images: Any = None
        self._detections: Any = None
        self._latency: Any = None
        self.disabled = False

    def __getstate__(self) -> dict[str, Any]:
        return {"tags": self.tags}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.get("tags"))  # type: ignore[misc]

    def _ensure(self) -> None:
        if self._images is not None:
            return
        from ray.util import metrics as m

        const = tuple(self.tags)
        self._images = m.Counter(
            IMAGES_METRIC,
            description="Inputs processed by SAM 3 actors, by status and error reason.",
            tag_keys=(*const, "status", "reason"),
        )
        self._detections = m.Counter(
            DETECTIONS_METRIC,
            description="Instances kept after post-processing, by concept name.",
            tag_keys=(*const, "concept"),
        )
        self._latency = m.Histogram(
            LATENCY_METRIC,
            description="Per-image SAM 3 inference latency in milliseconds.",
            boundaries=list(LATENCY_BOUNDARIES_MS),
            tag_keys=const,
        )
        if self.tags:
            for metric in (self._images, self._detections, self._latency):
                metric.set_default_tags(self.tags)

    def _fail(self, exc: Exception) -> None:
        self.disabled = True
        logger.warning("metrics disabled in this process: %s: %s", type(exc).__name__, exc)

    def record_image(self, status: str, reason: str | None = None) -> None:
        if self.disabled:
            return
        try:
            self._ensure()
            self._images.inc(1.0, tags={"status": status, "reason": reason or _NO_REASON})
        except Exception as exc:
            self._fail(exc)

    def record_detections(self, concept: str, n: int) -> None:
        if self.disabled or n <= 0:  # Ray counters reject 0 increments; nothing to count
            return
        try:
            self._ensure()
            self._detections.inc(float(n), tags={"concept": concept})
        except Exception as exc:
            self._fail(exc)

    def record_latency(self, ms: float) -> None:
        if self.disabled:
            return
        try:
            self._ensure()
            self._latency.observe(max(0.0, float(ms)))
        except Exception as exc:
            self._fail(exc)
