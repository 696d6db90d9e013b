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


def test_cuda_bf16_weights_run_and_pack_queries(tiny_checkpoint):
    from sam3ray import InferenceConfig, Sam3Engine

    eng = Sam3Engine.from_checkpoint(
        tiny_checkpoint,
        _concepts(),
        InferenceConfig(conf=0.3, queries_per_forward=64),
        device="cuda",
        dtype="bfloat16",
    )
    dtypes = {p.dtype for p in eng.model.parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}  # bf16 weights, float32 norms
    out = eng.predict(_images())
    assert eng.stats.grounding_forwards == 1  # 4 images × 3 texts in one pack on GPU
    assert sum(map(len, out)) > 0
    for dets in out:
        for d in dets:
            assert np.isfinite(d.score) and d.area >= 0


def test_rle_counts_on_cuda_equal_pycocotools():
    from pycocotools import mask as mask_utils

    from sam3ray.model.postprocess import coco_strings, rle_counts

    rng = np.random.default_rng(0)
    for n, h, w in [(5, 777, 1036), (3, 1, 257), (3, 257, 1), (2, 31, 17)]:
        masks = rng.random((n, h, w)) > 0.7
        masks[0] = False
        counts, lengths, areas = rle_counts(torch.from_numpy(masks).cuda())
        got = coco_strings(counts.cpu().numpy(), lengths.cpu().numpy())
        ref = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        assert got == [r["counts"] for r in ref]
        assert areas.cpu().tolist() == [int(m.sum()) for m in masks]


def test_batched_nms_on_cuda_equals_torchvision_per_group():
    from sam3ray.model.postprocess import batched_nms

    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=gen) * 400
    boxes = torch.cat([xy, xy + torch.rand(500, 2, generator=gen) * 120 + 1], 1).cuda()
    scores = torch.rand(500, generator=gen).cuda()
    groups = torch.randint(0, 9, (500,), generator=gen).cuda()
    want = []
    for g in groups.unique().tolist():
        idx = torch.nonzero(groups == g).flatten()
        want += idx[torch.ops.torchvision.nms(boxes[idx], scores[idx], 0.5)].tolist()
    got = torch.nonzero(batched_nms(boxes, scores, groups, 0.5)).flatten().tolist()
    assert got == sorted(want)


def test_auto_batch_sizes_fit_the_share_they_were_planned_for(tiny_checkpoint):
    """On CUDA, "auto" measures activation sizes on the device and plans to the share:
    a batch at the planned sizes stays within the budget."""
    from sam3ray import InferenceConfig, Sam3Engine

    eng = Sam3Engine.from_checkpoint(
        tiny_checkpoint, _concepts(), InferenceConfig(conf=0.3), device="cuda", gpu_share=0.25
    )
    plan = eng.batch_plan()
    assert plan.sizes is not None and plan.sizes.per_query > 0 and plan.sizes.per_image > 0
    assert plan.images_per_batch >= 1 and plan.queries_per_forward >= 1
    assert "over budget" not in plan.reason
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    images = [_images()[i % 4] for i in range(plan.images_per_batch)]
    eng.predict(images)
    assert torch.cuda.max_memory_allocated() - base <= plan.budget_bytes
