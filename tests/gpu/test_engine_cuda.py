"""GPU tier: the engine on CUDA (skipped on machines without one; CI has none).

Run on a GPU machine with ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _concepts():
    from sam3ray import Concept, ConceptSet
    from tests.support.jobs import CAT, PERSON

    return ConceptSet(
        (Concept(CAT, "cat", ("cat", "kitten")), Concept(PERSON, "person", ("person",)))
    )


def _images():
    from tests.support.images import scene

    return [scene(i, (160 + 48 * i, 320 - 40 * i)) for i in range(4)]


def test_cuda_float32_matches_cpu(tiny_checkpoint):
    from sam3ray import InferenceConfig, Sam3Engine

    cfg = InferenceConfig(conf=0.3)
    cpu = Sam3Engine.from_checkpoint(tiny_checkpoint, _concepts(), cfg, device="cpu")
    gpu = Sam3Engine.from_checkpoint(
        tiny_checkpoint, _concepts(), cfg, device="cuda", dtype="float32"
    )
    a, b = cpu.predict(_images()), gpu.predict(_images())
    assert sum(map(len, a)) > 0
    for da, db in zip(a, b, strict=True):
        sa = sorted((d.class_id, round(d.score, 3)) for d in da)
        sb = sorted((d.class_id, round(d.score, 3)) for d in db)
        assert len(sa) == len(sb)
        assert all(x[0] == y[0] and abs(x[1] - y[1]) <= 2e-3 for x, y in zip(sa, sb))


def test_cuda_bf16_autocast_runs_and_packs_queries(tiny_checkpoint):
    from sam3ray import InferenceConfig, Sam3Engine

    eng = Sam3Engine.from_checkpoint(
        tiny_checkpoint,
        _concepts(),
        InferenceConfig(conf=0.3, queries_per_forward=64),
        device="cuda",
        dtype="bfloat16",
    )
    out = eng.predict(_images())
    assert eng.stats.grounding_forwards == 1  # 4 images × 3 texts in one pack on GPU
    assert sum(map(len, out)) > 0
    for dets in out:
        for d in dets:
            assert np.isfinite(d.score) and d.area >= 0
