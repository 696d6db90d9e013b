"""A 500-image job on the session's local Ray: every input once, nothing held on the driver.

The 5,000-image version with driver-memory measurements is ``benchmarks/load.py``;
this one only checks outcomes (no timing assertions: CI machines vary).
"""

from __future__ import annotations

from collections import Counter

import pytest

from sam3ray.core.ids import input_id
from sam3ray.runner.job import run_job
from tests.support.jobs import THING_CSV, fault_job_config, read_tables, write_concepts

N = 500


@pytest.fixture(scope="module")
def small_tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny model at 168 px (4x cheaper than the 336 px one): load is the point here."""
    from sam3ray.model.tiny import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("ckpt168") / "sam3-tiny-168.pt"
    return str(make_tiny_checkpoint(path, seed=0, resolution=168))


def write_small_images(root, n: int) -> list[str]:
    """``n`` 64x64 PNG scenes, 100 per folder; returns their absolute paths."""
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.zeros((64, 64, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        y, x = rng.integers(0, 40, 2)
        img[y : y + 24, x : x + 24] = rng.integers(0, 256, 3, dtype=np.uint8)
        path = root / f"d{i // 100:02d}" / f"img-{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return sorted(paths)


def test_500_images_each_exactly_once(ray_session, small_tiny_checkpoint, tmp_path):
    paths = write_small_images(tmp_path / "images", N)
    cfg = fault_job_config(
        uris=[str(tmp_path / "images")],
        concepts=write_concepts(tmp_path / "prompts", THING_CSV),
        checkpoint=small_tiny_checkpoint,
        output=str(tmp_path / "out"),
        shard_size=64,
    )
    cfg.inference.conf = 0.9  # few detections: the load is in the inputs
    summary = run_job(cfg)

    assert (summary["inputs_total"], summary["ok"], summary["errors"]) == (N, N, 0)
    images, detections = read_tables(str(tmp_path / "out"))
    assert images.num_rows == N
    counts = Counter(images.column("uri").to_pylist())
    assert sorted(counts) == paths and set(counts.values()) == {1}
    assert set(images.column("status").to_pylist()) == {"ok"}
    assert sorted(images.column("image_id").to_pylist()) == sorted(map(input_id, paths))
    assert sum(images.column("n_detections").to_pylist()) == detections.num_rows
    assert summary["detections"] == detections.num_rows
    assert summary["shards"]["done_now"] >= N // 128  # shards of ~64 (at most 128)
