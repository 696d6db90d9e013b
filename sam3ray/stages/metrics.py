"""What a stage may record (images by status, detections by concept, latency).

The stages stay Ray-free, so they talk to this tiny protocol;
:class:`NullMetrics` is the default for tests and local use, and
``runner.metrics.RayMetrics`` exports the same calls to Prometheus.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Metrics(Protocol):
    """What a stage may record; implementations must never raise into the stage."""

    def record_image(self, status: str, reason: str | None = None) -> None:
        """One input finished with ``status`` (ok|error|skipped) and an error ``reason``."""

    def record_detections(self, concept: str, n: int) -> None:
        """``n`` instances of ``concept`` were kept on one image (or shard)."""

    def record_latency(self, ms: float) -> None:
        """Inference time of one image, in milliseconds."""


class NullMetrics:
    """Records nothing: the default, so stages need no ``if metrics`` checks."""

    def record_image(self, status: str, reason: str | None = None) -> None:
        pass

    def record_detections(self, concept: str, n: int) -> None:
        pass

    def record_latency(self, ms: float) -> None:
        pass
