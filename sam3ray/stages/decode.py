"""Decode stage (CPU tasks): read an image shard's bytes and decode them.

Every input becomes a :class:`DecodedImage`: pixels (upright per EXIF, RGB,
shrunk to ``inference.max_imgsz`` on the long side so rows stay small) with the
original size kept to map boxes and masks back, or the reason it has none. One
poison file costs only itself.
"""

from __future__ import annotations

import time

import numpy as np

from sam3ray.config.schema import InferenceConfig, InputConfig, ResourcesConfig
from sam3ray.core.errors import error_reason, error_text
from sam3ray.sources.images import decode_image, downscale_long_side
from sam3ray.stages.base import Resources
from sam3ray.stages.tasks import DecodedImage, DecodedShard, ShardTask


class DecodeStage:
    """ShardTask → DecodedShard."""

    name = "decode"

    def __init__(
        self, source: InputConfig, inference: InferenceConfig, resources: ResourcesConfig
    ) -> None:
        self.source = source
        self.max_imgsz = inference.max_imgsz
        self.resources = Resources(cpus=resources.decode_cpus)

    def setup(self) -> None:
        """Nothing heavy: decoding needs no state."""

    def decode_one(self, uri: str, image_id: str) -> DecodedImage:
        t0 = time.perf_counter()
        try:
            data = self.source.location(uri).read_bytes()
            img = decode_image(data, max_pixels=self.source.max_pixels)
            h, w = img.shape[:2]
            small = np.ascontiguousarray(downscale_long_side(img, self.max_imgsz))
            return DecodedImage(uri, image_id, small, (h, w), _ms(t0))
        except Exception as exc:  # one poison file must not cost the shard
            return DecodedImage(
                uri, image_id, None, None, _ms(t0), error_text(exc), error_reason(exc)
            )

    def process(self, task: ShardTask) -> DecodedShard:
        shard = task.shard
        if not task.concepts:  # drops only: nothing to label, nothing to read
            return DecodedShard(task, ())
        images = tuple(self.decode_one(u, i) for u, i in zip(shard.uris, shard.image_ids))
        return DecodedShard(task, images)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
