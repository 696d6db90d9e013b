"""Memory you can plan: the meter, activation sizes measured on the real (tiny) SAM 3,
and the batch sizes planned from them.

The full-size numbers come from ``benchmarks/memory.py --full-size`` (same code,
the released architecture with random weights); on a GPU the engine measures its
own sizes at actor start with the CUDA allocator's peak instead of :class:`LiveBytes`.
"""

from __future__ import annotations

import pytest
import torch

from sam3ray import Concept, ConceptSet, Sam3Engine, load_sam3_image_model
from sam3ray.model.memory import ActivationSizes, LiveBytes, measure_activations, plan_batches

CAT = "0b0c7f5e-0000-4000-8000-000000000001"
CONCEPTS = ConceptSet((Concept(CAT, "cat", ("cat",)),))
MiB = 2**20


pytestmark = pytest.mark.usefixtures("one_thread")


def test_live_bytes_counts_new_storages_until_they_die():
    before = torch.zeros(1000, 1000)  # made before: never counted
    with LiveBytes() as meter:
        meter.reset_peak()
        a = torch.zeros(1000, 1000)  # 4 MB
        b = a + 1  # 4 MB
        view = b.view(-1)  # no new memory
        alias = before.t()  # a view of something older: nothing
        del a
        c = torch.ones(500, 1000)  # 2 MB
        assert meter.current == 6_000_000 and meter.peak == 8_000_000
        meter.reset_peak()
        d = c * 2  # 2 MB more than at the reset
        assert meter.peak == 2_000_000
    del b, view, c, d, alias
    assert meter.current == 0


def pack_peak(engine, queries: int) -> int:
    """Peak bytes of one grounding pack of ``queries`` on one image, measured directly."""
    with torch.inference_mode(), LiveBytes() as meter:
        image = torch.zeros((1, 3, engine.resolution, engine.resolution))
        out = engine.model.backbone.forward_image(image)
        engine.encode_texts({"cat"})
        feats, mask = engine.text_features("cat")
        meter.reset_peak()
        ids = torch.zeros(queries, dtype=torch.long)
        result = engine.forward_pack(out, ids, ids, feats, mask)
        masks = result["pred_masks"]
        shape = tuple(masks.shape)
        peak = meter.peak
    assert shape[0] == queries
    return peak, shape


def test_activation_sizes_measured_on_the_tiny_model_predict_a_larger_pack(tiny_checkpoint):
    """Per-query and per-image sizes from 1- and 3-query packs predict a 10-query pack's
    peak (the planner relies on linearity), and a query costs at least its own
    pred_masks (queries × num_queries × h' × w', the tensor DESIGN.md warns about)."""
    model = load_sam3_image_model(tiny_checkpoint, device="cpu")
    engine = Sam3Engine(model, CONCEPTS, device="cpu")
    sizes = measure_activations(engine, LiveBytes())
    assert sizes.per_image > 0 and sizes.per_query > 0 and sizes.fixed >= 0
    peak10, shape = pack_peak(engine, 10)
    predicted = sizes.fixed + 10 * sizes.per_query
    assert 0.8 * peak10 <= predicted <= 1.25 * peak10, (peak10, predicted, sizes)
    _, nq, mh, mw = shape
    assert (nq, mh, mw) == (20, 96, 96)  # tiny at 336 px: 20 queries, 4 × the 24² patch grid
    assert sizes.per_query >= nq * mh * mw * 4  # float32 pred_masks of one query
    # One image: at least its backbone features (the 4× finest FPN level alone, d_model 64).
    assert sizes.per_image >= 64 * mh * mw * 4


def test_bfloat16_halves_the_per_query_activations(tiny_checkpoint):
    fp32 = measure_activations(
        Sam3Engine(load_sam3_image_model(tiny_checkpoint), CONCEPTS, device="cpu"), LiveBytes()
    )
    bf16 = measure_activations(
        Sam3Engine(
            load_sam3_image_model(tiny_checkpoint), CONCEPTS, device="cpu", dtype="bfloat16"
        ),
        LiveBytes(),
    )
    assert 0.4 <= bf16.per_query / fp32.per_query <= 0.6


SIZES = ActivationSizes(per_image=500 * MiB, per_query=100 * MiB, fixed=200 * MiB)


def test_plan_fills_the_budget_images_first_up_to_half():
    plan = plan_batches(SIZES, budget=4000 * MiB, queries_per_image=10)
    # half of (4000 - 200) for images -> 3 images; the rest (3800 - 1500) for queries -> 23
    assert (plan.images_per_batch, plan.queries_per_forward) == (3, 23)
    need = 3 * 500 + 200 + 23 * 100
    assert need <= 4000 and "over budget" not in plan.reason
    # queries never exceed what the batch can fill
    few = plan_batches(SIZES, budget=4000 * MiB, queries_per_image=2)
    assert (few.images_per_batch, few.queries_per_forward) == (3, 6)


def test_plan_keeps_explicit_sizes_and_says_when_they_do_not_fit():
    plan = plan_batches(SIZES, 4000 * MiB, 10, images_per_batch=2, queries_per_forward="auto")
    assert (plan.images_per_batch, plan.queries_per_forward) == (2, 20)  # 2 images × 10
    plan = plan_batches(SIZES, 4000 * MiB, 10, images_per_batch="auto", queries_per_forward=8)
    assert plan.queries_per_forward == 8 and plan.images_per_batch == 6  # (3800 - 800) // 500
    plan = plan_batches(SIZES, 1000 * MiB, 10, images_per_batch=8, queries_per_forward=64)
    assert (plan.images_per_batch, plan.queries_per_forward) == (8, 64)
    assert "over budget" in plan.reason


def test_plan_on_a_tiny_budget_still_runs_one_image_one_query():
    plan = plan_batches(SIZES, budget=100 * MiB, queries_per_image=10)
    assert (plan.images_per_batch, plan.queries_per_forward) == (1, 1)
    assert "over budget" in plan.reason


def test_post_processing_reserve_covers_a_mask_step_and_an_nms_step():
    """What a plan reserves beyond the forward is the peak of the steps that follow it:
    a mask-encoding step (16 M pixels, or one mask of max_imgsz² if larger) and an NMS
    step. Without max_imgsz, masks are upsampled at the original size: the reserve is a
    full step, not the model's 1008² grid (8 MB) it once was."""
    from sam3ray.model.batches import (
        MASK_BYTES_PER_PIXEL,
        MASK_PIXELS_PER_STEP,
        post_processing_bytes,
    )
    from sam3ray.model.postprocess import NMS_BYTES_PER_ELEMENT, NMS_ELEMENTS_PER_STEP

    step = MASK_BYTES_PER_PIXEL * MASK_PIXELS_PER_STEP
    nms = NMS_BYTES_PER_ELEMENT * NMS_ELEMENTS_PER_STEP
    assert post_processing_bytes(None) == max(step, nms) >= 128 * 2**20
    assert post_processing_bytes(1024) == post_processing_bytes(None)  # 1 M px < a step
    assert post_processing_bytes(8192) == MASK_BYTES_PER_PIXEL * 8192**2  # one mask > a step


def test_batched_nms_peak_stays_within_its_reserve():
    """The NMS reserve is a measured bound: one full step's allocations (LiveBytes
    counts every storage alive at once) stay under NMS_BYTES_PER_ELEMENT per element."""
    from sam3ray.model.postprocess import NMS_BYTES_PER_ELEMENT, NMS_ELEMENTS_PER_STEP, batched_nms

    width = 1000  # one group of 1000 candidates: a 1000² IoU matrix, 1/4 of a step
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(width, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + torch.rand(width, 2, generator=g) * 100 + 1], dim=1)
    scores = torch.rand(width, generator=g)
    groups = torch.zeros(width, dtype=torch.long)
    with LiveBytes() as live:
        live.reset_peak()
        batched_nms(boxes, scores, groups, 0.5)
    assert width * width <= NMS_ELEMENTS_PER_STEP
    assert live.peak <= NMS_BYTES_PER_ELEMENT * width * width
