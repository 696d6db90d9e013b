"""Integration fixtures: one real local Ray for the session, small generated image sets.

Everything here is real: Ray starts worker processes and an actor pool, images
are JPEG/PNG files on disk or objects in the session's moto S3 server
(127.0.0.1), and the model is the tiny random-weight SAM 3 from the repo-root
``tiny_checkpoint`` fixture. Sizes are kept small so that the whole tier runs
in a few minutes on two cores: ~12-16 images of at most 320 px, 3 classes.

The reference for "what the job should have produced" is :func:`engine_reference`:
``Sam3Engine`` run directly in this process over the same bytes, decoded as the
image actors' reader does (original size, upright, RGB).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from sam3ray.core.ids import input_id
from tests.support.images import scene_bytes
from tests.support.jobs import (  # noqa: F401 - re-exported through the ``it`` fixture
    CAT,
    CLASS_IDS,
    CONCEPTS_CSV,
    INFERENCE,
    PERSON,
    ROCKET,
    config_yaml,
    job_config,
    write_concepts,
)
from tests.support.jobs import read_tables as read_output  # noqa: F401

_HERE = Path(__file__).resolve().parent
#: This module object: test files reach the helpers through the ``it`` fixture, because
#: conftest modules share the name "conftest" and cannot be imported reliably by name.
_SELF = sys.modules[__name__]

#: (height, width) cycled over the generated images: all <= 320 px, portrait and landscape.
SIZES = ((240, 320), (320, 240), (200, 200), (180, 300), (320, 320), (160, 256))


def pytest_collection_modifyitems(config, items) -> None:
    """Every test under tests/integration/ carries the ``integration`` marker."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def it():
    """The helpers and constants of this module (``it.CAT``, ``it.write_images(...)``)."""
    return _SELF


# -- Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (run_job reuses an initialised Ray).

    ``address="local"`` always starts a fresh instance, never attaching to a
    cluster someone else started on this machine with ``ray start``.
    """
    import ray

    if ray.is_initialized():  # pragma: no cover - a leftover from another fixture
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 1024 * 1024,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


# -- images and prompt tables -----------------------------------------------------------------


def image_bytes(seed: int, fmt: str) -> bytes:
    """A deterministic synthetic scene encoded as JPEG or PNG."""
    return scene_bytes(seed, SIZES[seed % len(SIZES)], fmt)


def image_names(n: int, start: int = 0) -> list[tuple[str, int, str]]:
    """(relative path, seed, format): JPEG and PNG, split over two sub-folders."""
    out = []
    for seed in range(start, start + n):
        fmt = "PNG" if seed % 3 == 0 else "JPEG"
        ext = "png" if fmt == "PNG" else "jpg"
        out.append((f"{'a' if seed % 2 else 'b'}/img-{seed:03d}.{ext}", seed, fmt))
    return out


def write_images(root: Path, n: int, start: int = 0) -> list[str]:
    """Write ``n`` scenes under ``root`` and return their absolute paths (as listed by a job)."""
    paths = []
    for rel, seed, fmt in image_names(n, start):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(seed, fmt))
        paths.append(str(path.resolve()))
    return sorted(paths)


def upload_images(moto_s3, bucket: str, prefix: str, n: int, start: int = 0) -> list[str]:
    """Upload ``n`` scenes under ``s3://bucket/prefix/`` and return their URIs."""
    return sorted(
        moto_s3.put(bucket, f"{prefix.strip('/')}/{rel}", image_bytes(seed, fmt))
        for rel, seed, fmt in image_names(n, start)
    )


# -- reading the output with generic readers --------------------------------------------------


def check_images_invariant(images: pa.Table, detections: pa.Table, uris: Iterable[str]) -> None:
    """Every input exactly once in ``images``; detections only for ok inputs, counted right."""
    uris = sorted(uris)
    rows = images.to_pylist()
    assert sorted(r["uri"] for r in rows) == uris, "every input exactly once"
    assert len({r["image_id"] for r in rows}) == len(uris)
    for r in rows:
        assert r["image_id"] == input_id(r["uri"])
        assert r["status"] in ("ok", "error")
    ok = {r["image_id"] for r in rows if r["status"] == "ok"}
    det_ids = detections.column("image_id").to_pylist()
    assert set(det_ids) <= ok, "detections exist only for inputs with status ok"
    per_image: dict[str, int] = defaultdict(int)
    for i in det_ids:
        per_image[i] += 1
    for r in rows:
        assert r["n_detections"] == per_image.get(r["image_id"], 0), r["uri"]
        if r["status"] == "error":
            assert r["n_detections"] == 0 and r["error"] and r["error_reason"]
    for d in detections.select(["image_id", "width", "height", "mask_size"]).to_pylist():
        img = next(r for r in rows if r["image_id"] == d["image_id"])
        assert (d["width"], d["height"]) == (img["width"], img["height"])
        assert d["mask_size"] == [img["height"], img["width"]], "masks in original pixels"


def scores_by_key(detections: pa.Table) -> dict[tuple[str, str], list[float]]:
    """(image_id, class_id) -> scores, descending."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in detections.select(["image_id", "class_id", "score"]).to_pylist():
        out[(r["image_id"], str(r["class_id"]))].append(float(r["score"]))
    return {k: sorted(v, reverse=True) for k, v in out.items()}


def detection_set(detections: pa.Table) -> set[tuple[str, str, float]]:
    return {
        (r["image_id"], str(r["class_id"]), round(float(r["score"]), 5))
        for r in detections.select(["image_id", "class_id", "score"]).to_pylist()
    }


# -- the engine run directly (the reference) --------------------------------------------------


def engine_for(checkpoint: str, concepts_uri: str, storage_options: dict[str, Any] | None = None):
    """``Sam3Engine`` with the integration jobs' inference parameters."""
    from sam3ray import InferenceConfig, Sam3Engine
    from sam3ray.sources.prompts import load_concepts
    from sam3ray.storage.location import Location

    concepts = load_concepts(Location(concepts_uri, storage_options or {}))
    return Sam3Engine.from_checkpoint(
        checkpoint, concepts, InferenceConfig(**INFERENCE), device="cpu", dtype="float32"
    )


def decode_like_the_job(uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Bytes → upright RGB at the original size: what the image actors' reader gives the model."""
    from sam3ray.sources.images import decode_image
    from sam3ray.storage.location import Location

    data = Location(uri, storage_options or {}).read_bytes()
    return decode_image(data, max_pixels=178_956_970)


def engine_reference(
    engine, uris: Sequence[str], storage_options: dict[str, Any] | None = None, exemplars=None
) -> dict[tuple[str, str], list[float]]:
    """(image_id, class_id) -> scores (descending) from the engine run directly."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    step = INFERENCE["images_per_batch"]
    uris = list(uris)
    for start in range(0, len(uris), step):
        chunk = uris[start : start + step]
        results = engine.predict(
            [decode_like_the_job(u, storage_options) for u in chunk],
            exemplars=None if exemplars is None else [exemplars.get(u) for u in chunk],
        )
        for uri, found in zip(chunk, results):
            for d in found:
                out[(input_id(uri), d.class_id)].append(float(d.score))
    return {k: sorted(v, reverse=True) for k, v in out.items()}


def assert_same_as_engine(
    got: dict[tuple[str, str], list[float]], want: dict[tuple[str, str], list[float]]
) -> None:
    """Same (image_id, class_id) keys, same counts, scores within 1e-5."""
    assert sum(map(len, want.values())) > 0, "the reference found nothing: a vacuous comparison"
    assert set(got) == set(want)
    for key, scores in want.items():
        assert len(got[key]) == len(scores), key
        np.testing.assert_allclose(got[key], scores, rtol=0, atol=1e-5, err_msg=str(key))


@pytest.fixture(scope="session")
def concepts_csv(tmp_path_factory) -> str:
    return write_concepts(tmp_path_factory.mktemp("prompts") / "concepts.csv")


@pytest.fixture(scope="session")
def direct_engine(tiny_checkpoint, concepts_csv):
    """The reference engine (loaded once for the session, in this process)."""
    return engine_for(tiny_checkpoint, concepts_csv)
