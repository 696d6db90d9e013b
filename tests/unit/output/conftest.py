"""Fixtures of the output tests: an output on each backend, and the rows of one image shard.

``out``: a ``Location`` on a local directory and on the session's moto S3 server
(``tests/conftest.py``), so every writer/marker test runs against both.
``rows``: builders of detections and images rows that pass the writer's checks.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sam3ray.core.ids import stable_id
from sam3ray.output.schema import detections_table, images_table
from sam3ray.plan.shards import image_shard_id
from sam3ray.storage.location import Location


class ShardRows:
    """One image shard's data: three images (two ok, one error), cat and dog detections."""

    RUN = "run-20260101-abc"
    CAT = "123e4567-e89b-42d3-a456-426614174000"
    DOG = "00000000-0000-4000-8000-000000000001"
    URIS = tuple(f"s3://src/img/{i}.jpg" for i in range(3))
    SHARD = image_shard_id(stable_id(u) for u in URIS)

    def det(self, uri: str, class_id: str, score: float, frame_index: int | None = None) -> dict:
        return {
            "run_id": self.RUN,
            "image_id": stable_id(uri),
            "uri": uri,
            "frame_index": frame_index,
            "class_id": class_id,
            "concept": "cat" if class_id == self.CAT else "dog",
            "query": 'text:"cat"',
            "score": score,
            "box": np.array([1.0, 2.0, 30.0, 40.0]),
            "mask_rle": "abc",
            "mask_size": [48, 64],
            "area": 100,
            "width": 64,
            "height": 48,
            "model": "sam3-tiny@0123abcd",
        }

    def image(self, uri: str, status: str = "ok", n: int = 0, shard_id: str | None = None) -> dict:
        row = {
            "run_id": self.RUN,
            "image_id": stable_id(uri),
            "uri": uri,
            "shard_id": shard_id or self.SHARD,
        }
        row.update(status=status, n_detections=n, decode_ms=1.5, infer_ms=2.5)
        if status == "error":
            row.update(error="cannot identify image file", error_reason="decode_error")
        else:
            row.update(width=64, height=48)
        return row

    def tables(self, classes: tuple[str, ...] | None = None) -> tuple[pa.Table, pa.Table]:
        """Two ok images with two detections per class, one error image."""
        classes = (self.CAT, self.DOG) if classes is None else classes
        uris = self.URIS
        dets = [self.det(u, c, s) for u in reversed(uris[:2]) for c in classes for s in (0.5, 0.9)]
        imgs = [self.image(u, n=2 * len(classes)) for u in uris[:2]]
        imgs.append(self.image(uris[2], "error"))
        return detections_table(dets), images_table(imgs)


@pytest.fixture()
def rows() -> ShardRows:
    return ShardRows()


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> Location:
    """An empty output root (``labels``) on a local disk, then on moto S3."""
    if request.param == "local":
        return Location(str(tmp_path / "labels"))
    s3 = request.getfixturevalue("moto_s3")
    return Location(f"s3://{s3.new_bucket('sam3ray-out')}/labels", dict(s3.storage_options))
