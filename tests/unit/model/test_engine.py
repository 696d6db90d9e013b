"""Sam3Engine on the tiny random-weight SAM 3.

Fidelity to the official ``Sam3Processor`` (one image, one prompt at a time;
small images and photos above 2000 px, whose pixels must reach the model by the
official single resize), the work sharing that makes the engine worth having
(backbone once per image, text encoder once per unique text), every
post-processing knob against a known outcome derived from the engine's own
unfiltered output, bfloat16 weights, out-of-memory packs, and input validation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from sam3ray import Concept, ConceptSet, Exemplar, InferenceConfig, Sam3Engine
from sam3ray.core.masks import decode_rle, rle_iou
from sam3ray.model.batches import mask_grid
from tests.support.images import scene

RESOLUTION = 336  # Sam3Arch.tiny()
CAT = "0b0c7f5e-0000-4000-8000-000000000001"
DOG = "0b0c7f5e-0000-4000-8000-000000000002"
BIRD = "0b0c7f5e-0000-4000-8000-000000000003"
THING = "0b0c7f5e-0000-4000-8000-000000000004"
#: No post-processing at all: every one of the 20 decoder queries of every prompt.
RAW = InferenceConfig(conf=0.0, nms=False, max_det=100_000)


pytestmark = pytest.mark.usefixtures("one_thread")


def box_xyxy(h: int, w: int, fx0: float, fy0: float, fx1: float, fy1: float):
    return (round(fx0 * w, 1), round(fy0 * h, 1), round(fx1 * w, 1), round(fy1 * h, 1))


def cxcywh_norm(coords, h: int, w: int) -> list[float]:
    """The same normalisation the engine applies (queries.build_queries)."""
    x0, y0, x1, y1 = coords
    return [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]


def by_class(dets, class_id: str):
    return [d for d in dets if d.class_id == class_id]


def key(d) -> tuple:
    """Identity of a detection for set comparisons (exact floats: same forward pass)."""
    return (d.class_id, d.query, d.score, d.box)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_nms(dets, iou: float):
    """Brute-force per-class greedy NMS over a detection list (score order, ties by position)."""
    kept = []
    for cls in dict.fromkeys(d.class_id for d in dets):
        cands = sorted(by_class(dets, cls), key=lambda d: -d.score)
        keep: list = []
        for d in cands:
            if all(box_iou(d.box, k.box) <= iou for k in keep):
                keep.append(d)
        kept.extend(keep)
    return kept


@dataclass
class Calls:
    """Real forward calls of the vision trunk and the text encoder, with their batch sizes."""

    vision: list[int] = field(default_factory=list)
    text: list[list[str]] = field(default_factory=list)


@pytest.fixture
def calls(tiny_model):
    """Count real backbone calls with forward hooks.

    ``SAM3VLBackbone`` invokes ``vision_backbone.forward(...)`` directly, which
    bypasses module hooks, so the hook sits on its ViT trunk (called normally,
    once per vision-backbone forward). The text encoder is called normally.
    """
    rec = Calls()
    backbone = tiny_model.backbone
    handles = [
        backbone.vision_backbone.trunk.register_forward_pre_hook(
            lambda _m, args: rec.vision.append(int(args[0].shape[0]))
        ),
        backbone.language_backbone.register_forward_pre_hook(
            lambda _m, args: rec.text.append(list(args[0]))
        ),
    ]
    yield rec
    for h in handles:
        h.remove()


# --------------------------------------------------------------------------- fidelity

FIDELITY_SIZES = [(200, 300), (336, 240), (160, 160)]
FIDELITY_CONF = 0.5


def fidelity_inputs():
    images = [scene(10 + i, (h, w)) for i, (h, w) in enumerate(FIDELITY_SIZES)]
    concepts = ConceptSet(
        (
            Concept(CAT, "cat", ("cat",)),  # text only
            Concept(DOG, "dog", ("dog",)),  # text + positive box
            Concept(BIRD, "bird", ("bird",)),  # text + negative box
            Concept(THING, "thing", ()),  # box only ("visual")
        )
    )
    exemplars, plan = [], []
    for h, w in FIDELITY_SIZES:
        pos = box_xyxy(h, w, 0.15, 0.2, 0.6, 0.75)
        neg = box_xyxy(h, w, 0.5, 0.45, 0.95, 0.95)
        exemplars.append(
            {
                DOG: [Exemplar("box", pos, positive=True)],
                BIRD: [Exemplar("box", neg, positive=False)],
                THING: [Exemplar("box", pos, positive=True)],
            }
        )
        plan.append(
            {
                CAT: ("cat", None, None, 'text:"cat"'),
                DOG: ("dog", pos, True, 'text:"dog" +1 box'),
                BIRD: ("bird", neg, False, 'text:"bird" -1 box'),
                THING: (None, pos, True, "visual +1 box"),
            }
        )
    return images, concepts, exemplars, plan


def reference_detections(processor, image: np.ndarray, text, box, positive):
    """The official path, one image and one prompt at a time, boxes clamped like the engine's."""
    h, w = image.shape[:2]
    state = processor.set_image(Image.fromarray(image))  # fresh state per query
    if text is not None:
        state = processor.set_text_prompt(text, state)
    if box is not None:
        state = processor.add_geometric_prompt(cxcywh_norm(box, h, w), positive, state)
    boxes = state["boxes"].float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    order = torch.argsort(state["scores"], descending=True, stable=True)
    return (
        state["scores"][order].tolist(),
        boxes[order].tolist(),
        state["masks"][order, 0].numpy(),
    )


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare_with_processor(model, images, concepts, exemplars, plan) -> int:
    """Engine vs Sam3Processor per (image, prompt): scores within 1e-4, boxes within
    0.5 px, masks IoU >= 0.99, in original pixels. Returns detections compared."""
    from sam3.model.sam3_image_processor import Sam3Processor

    cfg = InferenceConfig(conf=FIDELITY_CONF, nms=False, max_det=100_000)
    engine = Sam3Engine(model, concepts, cfg, device="cpu")
    got = engine.predict(images, exemplars)
    processor = Sam3Processor(
        model, resolution=RESOLUTION, device="cpu", confidence_threshold=FIDELITY_CONF
    )
    compared = 0
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        for class_id, (text, box, positive, label) in plan[i].items():
            ref_scores, ref_boxes, ref_masks = reference_detections(
                processor, image, text, box, positive
            )
            mine = by_class(got[i], class_id)  # engine output is sorted by score
            where = f"image {i} ({h}x{w}), {label}"
            assert len(mine) == len(ref_scores), where
            for d, s, b, m in zip(mine, ref_scores, ref_boxes, ref_masks):
                assert d.query == label, where
                assert d.mask_size == (h, w)
                assert abs(d.score - s) <= 1e-4, where
                assert max(abs(x - y) for x, y in zip(d.box, b)) <= 0.5, where
                mask = decode_rle(d.mask_rle, d.mask_size)
                assert mask_iou(mask, m) >= 0.99, where
                assert d.area == int(mask.sum())
                compared += 1
    return compared


def test_fidelity_to_official_sam3_processor(tiny_model):
    images, concepts, exemplars, plan = fidelity_inputs()
    compared = compare_with_processor(tiny_model, images, concepts, exemplars, plan)
    # Not vacuous: detections were compared and the threshold rejected some.
    assert compared >= 20
    assert compared < len(images) * 4 * 20


def test_fidelity_on_photos_above_2000_px(tiny_model):
    """Real photos are larger than the model input: the model must see what
    Sam3Processor feeds it (one resize of the original), masks and boxes come back in
    original pixels. Landscape, portrait and a 3:1 panorama."""
    sizes = [(1500, 2000), (2100, 1400), (1000, 3000)]
    images = [scene(60 + i, size) for i, size in enumerate(sizes)]
    concepts = ConceptSet((Concept(CAT, "cat", ("cat",)), Concept(THING, "thing", ())))
    exemplars, plan = [], []
    for h, w in sizes:
        pos = box_xyxy(h, w, 0.2, 0.25, 0.55, 0.7)
        exemplars.append({THING: [Exemplar("box", pos, positive=True)]})
        plan.append(
            {CAT: ("cat", None, None, 'text:"cat"'), THING: (None, pos, True, "visual +1 box")}
        )
    compared = compare_with_processor(tiny_model, images, concepts, exemplars, plan)
    assert compared >= 10


def test_model_input_is_the_processors_to_the_bit(tiny_model):
    """The pixels the backbone gets equal Sam3Processor.set_image's, for a large photo
    of each orientation (one antialiased resize of the original uint8 image)."""
    from sam3.model.sam3_image_processor import Sam3Processor
    from torchvision.transforms import v2

    engine = Sam3Engine(tiny_model, ConceptSet((Concept(CAT, "cat", ("cat",)),)), device="cpu")
    processor = Sam3Processor(tiny_model, resolution=RESOLUTION, device="cpu")
    for size in [(1500, 2000), (2100, 1400), (1000, 3000), (200, 300)]:
        image = scene(70, size)
        mine = engine._preprocess([image])[0]
        theirs = processor.transform(v2.functional.to_image(Image.fromarray(image)))
        assert mine.shape == (3, RESOLUTION, RESOLUTION)
        assert torch.equal(mine, theirs), size


# --------------------------------------------------------------------------- work sharing


def test_backbone_once_per_image_text_encoder_once_per_unique_text(tiny_model, calls):
    concepts = ConceptSet(
        (
            Concept(CAT, "cat", ("cat", "kitten")),
            Concept(DOG, "dog", ("dog",)),
            Concept(BIRD, "bird", ("dog", "puppy")),  # shares the text "dog" with DOG
            Concept(THING, "thing", ()),  # exemplars only -> the "visual" text
        )
    )
    images = [scene(i, (96 + 16 * i, 128)) for i in range(4)]
    ex = [
        {THING: [Exemplar("box", (10, 10, 60, 60))]},
        None,
        {THING: [Exemplar("point", (5, 5))]},
        None,
    ]
    engine = Sam3Engine(tiny_model, concepts, InferenceConfig(queries_per_forward=4), device="cpu")

    engine.predict(images, ex)
    n_queries = 4 * (2 + 1 + 2) + 2  # 5 text queries per image + 2 exemplar-only queries
    assert calls.vision == [4]  # one backbone forward for the whole batch
    assert len(calls.text) == 1  # one text-encoder forward ...
    assert sorted(calls.text[0]) == ["cat", "dog", "kitten", "puppy", "visual"]  # ... each once
    s = engine.stats
    assert (s.images, s.backbone_images, s.texts_encoded) == (4, 4, 5)
    assert s.queries == n_queries
    assert s.grounding_forwards == math.ceil(n_queries / 4)

    engine.predict(images[:2])  # more queries, no new text: the cache serves them
    assert calls.vision == [4, 2]
    assert len(calls.text) == 1
    assert (s.images, s.backbone_images, s.texts_encoded) == (6, 6, 5)
    assert s.queries == n_queries + 2 * 5

    # The cache lives per engine: a new engine encodes its texts once more.
    other = Sam3Engine(tiny_model, concepts, device="cpu")
    other.predict(images[:1])
    assert sorted(calls.text[1]) == ["cat", "dog", "kitten", "puppy"]
    assert calls.vision == [4, 2, 1]


def test_queries_per_forward_packing_does_not_change_results(tiny_model, monkeypatch):
    import sam3ray.model.engine as engine_mod

    images, concepts, exemplars, _ = fidelity_inputs()
    big = InferenceConfig(conf=0.2, queries_per_forward=64)
    one = Sam3Engine(
        tiny_model, concepts, InferenceConfig(conf=0.2, queries_per_forward=1), device="cpu"
    )
    many = Sam3Engine(tiny_model, concepts, big, device="cpu")
    capped = Sam3Engine(tiny_model, concepts, big, device="cpu")
    a = one.predict(images, exemplars)
    with monkeypatch.context() as m:  # lift the CPU cap: all 12 queries in one pack
        m.setattr(engine_mod, "CPU_QUERIES_PER_FORWARD", 64)
        b = many.predict(images, exemplars)
    c = capped.predict(images, exemplars)
    assert one.stats.grounding_forwards == 12
    assert many.stats.grounding_forwards == 1
    # on CPU packs are capped at CPU_QUERIES_PER_FORWARD (8): 12 -> 8 + 4
    assert engine_mod.CPU_QUERIES_PER_FORWARD == 8
    assert capped.stats.grounding_forwards == 2
    for x, y in zip(b, c, strict=True):
        assert [d.class_id for d in x] == [d.class_id for d in y]
        assert all(abs(p.score - q.score) <= 1e-5 for p, q in zip(x, y, strict=True))
    assert sum(map(len, a)) > 0
    for da, db in zip(a, b):
        assert [(d.class_id, d.query) for d in da] == [(d.class_id, d.query) for d in db]
        for x, y in zip(da, db):
            assert abs(x.score - y.score) <= 1e-5
            assert max(abs(p - q) for p, q in zip(x.box, y.box)) <= 1e-3
            assert rle_iou(x.mask_rle, y.mask_rle, x.mask_size) >= 0.999


def test_point_exemplar_runs_and_changes_the_output(tiny_model):
    image = scene(3, (200, 240))
    concepts = ConceptSet((Concept(CAT, "cat", ("cat",)),))
    engine = Sam3Engine(tiny_model, concepts, RAW, device="cpu")
    text_only = engine.predict([image])[0]
    with_point = engine.predict([image], [{CAT: [Exemplar("point", (120.0, 90.0))]}])[0]
    assert len(text_only) == len(with_point) == 20
    assert {d.query for d in with_point} == {'text:"cat" +1 point'}
    a = sorted(d.score for d in text_only)
    b = sorted(d.score for d in with_point)
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-3


def test_kept_mask_logits_do_not_pin_whole_packs(tiny_model, monkeypatch):
    """Memory regression (white-box): candidates waiting for post-processing must hold
    only their own low-res mask logits, not views pinning each pack's full
    queries × num_queries × h' × w' tensor until the batch ends (GBs at full size)."""
    import sam3ray.model.engine as engine_mod

    held: list[torch.Tensor] = []
    finish = engine_mod.finish_batch

    def spy(found, sizes, queries, ctx):
        held.extend(f[3] for f in found)
        return finish(found, sizes, queries, ctx)

    monkeypatch.setattr(engine_mod, "finish_batch", spy)
    images = [scene(1, (100, 120)), scene(2, (120, 100))]
    engine = Sam3Engine(
        tiny_model, KNOB_CONCEPTS, InferenceConfig(conf=0.8, queries_per_forward=2), device="cpu"
    )
    engine.predict(images)
    assert len(held) == 3  # 6 queries in packs of 2
    kept = sum(t.shape[0] for t in held)
    assert 0 < kept < 2 * 3 * 20  # the threshold dropped most candidates
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    own = sum(t.numel() * t.element_size() for t in held)
    assert sum(storages.values()) <= own


def test_a_pack_that_runs_out_of_memory_is_redone_in_halves(tiny_model, knob_images):
    """An out-of-memory error in a grounding pack (raised by a wrapper around the model's
    forward_grounding, as a GPU would) halves the pack; later packs stay at that size;
    the output is what packs of that size give."""
    concepts = KNOB_CONCEPTS
    cfg = InferenceConfig(conf=0.2, queries_per_forward=6)
    want = Sam3Engine(
        tiny_model, concepts, cfg.model_copy(update={"queries_per_forward": 3}), device="cpu"
    ).predict(knob_images)
    engine = Sam3Engine(tiny_model, concepts, cfg, device="cpu")
    real = tiny_model.forward_grounding
    packs: list[int] = []

    def forward_grounding(*args, find_input, **kwargs):
        packs.append(int(find_input.img_ids.numel()))
        if packs[-1] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(*args, find_input=find_input, **kwargs)

    tiny_model.forward_grounding = forward_grounding
    try:
        got = engine.predict(knob_images)
        again = engine.predict(knob_images)
    finally:
        del tiny_model.forward_grounding
    assert packs == [6, 3, 3] + [3, 3]  # 2 images × 3 texts; then packs of 3 from the start
    assert engine.stats.out_of_memory == 1 and engine.stats.grounding_forwards == 4
    for result in (got, again):
        assert [[key(d) for d in x] for x in result] == [[key(d) for d in x] for x in want]
        assert sum(map(len, result)) > 0


def test_batch_plan_on_cpu_keeps_explicit_sizes_and_fills_in_auto(tiny_model):
    auto = Sam3Engine(tiny_model, KNOB_CONCEPTS, InferenceConfig(), device="cpu").batch_plan()
    assert (auto.images_per_batch, auto.queries_per_forward) == (8, 8)
    cfg = InferenceConfig(images_per_batch=3, queries_per_forward=2)
    plan = Sam3Engine(tiny_model, KNOB_CONCEPTS, cfg, device="cpu").batch_plan()
    assert (plan.images_per_batch, plan.queries_per_forward) == (3, 2)


# --------------------------------------------------------------------------- post-processing

KNOB_CONCEPTS = ConceptSet((Concept(CAT, "cat", ("cat", "kitten")), Concept(DOG, "dog", ("dog",))))


@pytest.fixture(scope="module")
def knob_images():
    return [scene(21, (180, 240)), scene(22, (240, 200))]


@pytest.fixture(scope="module")
def raw(tiny_model, knob_images):
    """The engine's own unfiltered output (no threshold, no NMS, no cap)."""
    out = Sam3Engine(tiny_model, KNOB_CONCEPTS, RAW, device="cpu").predict(knob_images)
    assert [len(o) for o in out] == [60, 60]  # 3 queries × 20 decoder queries
    return out


def test_conf_keeps_exactly_the_scores_above_it(tiny_model, knob_images, raw):
    conf = 0.5
    got = Sam3Engine(
        tiny_model, KNOB_CONCEPTS, InferenceConfig(conf=conf, nms=False), device="cpu"
    ).predict(knob_images)
    for g, r in zip(got, raw):
        expected = [key(d) for d in r if d.score >= conf]
        assert 0 < len(expected) < len(r)
        assert [key(d) for d in g] == expected


def test_per_concept_min_score_overrides_conf(tiny_model, knob_images, raw):
    concepts = ConceptSet(
        (Concept(CAT, "cat", ("cat", "kitten"), min_score=0.8), Concept(DOG, "dog", ("dog",)))
    )
    cfg = InferenceConfig(conf=0.3, nms=False)
    got = Sam3Engine(tiny_model, concepts, cfg, device="cpu").predict(knob_images)
    for g, r in zip(got, raw):
        for cls, thr in ((CAT, 0.8), (DOG, 0.3)):
            expected = [key(d) for d in by_class(r, cls) if d.score >= thr]
            assert [key(d) for d in by_class(g, cls)] == expected
    cats = [d for g in got for d in by_class(g, CAT)]
    low_cats = [d for r in raw for d in by_class(r, CAT) if 0.3 <= d.score < 0.8]
    assert low_cats and all(d.score >= 0.8 for d in cats)  # the override had work to do


def test_max_det_keeps_the_top_scores_of_each_concept(tiny_model, knob_images, raw):
    """max_det is per (image, concept), so a concept's labels never depend on the others;
    the kept detections come best first per image, as the raw output does."""
    got = Sam3Engine(
        tiny_model, KNOB_CONCEPTS, InferenceConfig(conf=0.0, nms=False, max_det=7), device="cpu"
    ).predict(knob_images)
    for g, r in zip(got, raw):
        best = {key(d) for c in KNOB_CONCEPTS for d in by_class(r, c.class_id)[:7]}
        assert len(g) == 7 * len(KNOB_CONCEPTS)
        assert [key(d) for d in g] == [key(d) for d in r if key(d) in best]
        assert [d.score for d in r] == sorted((d.score for d in r), reverse=True)


@pytest.mark.parametrize("iou", [0.7, 0.5])
def test_nms_equals_brute_force_greedy_nms_over_the_raw_output(tiny_model, knob_images, raw, iou):
    """nms=True keeps exactly what greedy per-class NMS over the nms=False output keeps."""
    got = Sam3Engine(
        tiny_model, KNOB_CONCEPTS, InferenceConfig(conf=0.0, iou=iou, nms=True), device="cpu"
    ).predict(knob_images)
    for g, r in zip(got, raw):
        expected = greedy_nms(r, iou)
        assert len(expected) < len(r)
        assert sorted(key(d) for d in g) == sorted(key(d) for d in expected)


@pytest.mark.parametrize("iou", [0.7, 0.5])
def test_nms_no_two_returned_boxes_of_a_class_overlap_more_than_iou(tiny_model, knob_images, iou):
    """The invariant a user relies on, checked on the boxes the engine returns."""
    got = Sam3Engine(
        tiny_model, KNOB_CONCEPTS, InferenceConfig(conf=0.0, iou=iou, nms=True), device="cpu"
    ).predict(knob_images)
    for i, g in enumerate(got):
        for cls in (CAT, DOG):
            kept = by_class(g, cls)
            over = [
                (a.box, b.box, round(box_iou(a.box, b.box), 3))
                for n, a in enumerate(kept)
                for b in kept[n + 1 :]
                if box_iou(a.box, b.box) > iou
            ]
            assert over == [], f"image {i}, class {cls}: kept pairs overlapping > {iou}"


def test_synonyms_of_one_class_are_merged_by_nms(tiny_model, knob_images, raw):
    cfg = InferenceConfig(conf=0.3, iou=0.5, nms=True)
    got = Sam3Engine(tiny_model, KNOB_CONCEPTS, cfg, device="cpu").predict(knob_images)
    for g, r in zip(got, raw):
        cats_raw = [d for d in by_class(r, CAT) if d.score >= 0.3]
        per_text = Counter(d.query for d in cats_raw)
        assert set(per_text) == {'text:"cat"', 'text:"kitten"'}
        cats = by_class(g, CAT)
        assert 0 < len(cats) < sum(per_text.values())
        # Every kept detection is one of the raw ones and still names the text that found it.
        assert {key(d) for d in cats} <= {key(d) for d in cats_raw}
        assert {d.query for d in cats} <= {'text:"cat"', 'text:"kitten"'}
        assert all(d.concept == "cat" for d in cats)


def test_max_imgsz_caps_the_mask_grid_only(tiny_model):
    """inference.max_imgsz no longer touches what the model sees: scores and boxes (in
    original pixels) are identical; masks come on a grid whose long side is max_imgsz,
    recorded in mask_size, and cover what the full-resolution masks cover."""
    images = [scene(5, (240, 320)), scene(6, (300, 120)), scene(7, (100, 90))]
    concepts = ConceptSet((Concept(CAT, "cat", ("cat",)),))
    plain = Sam3Engine(tiny_model, concepts, InferenceConfig(conf=0.3, nms=False), device="cpu")
    capped = Sam3Engine(
        tiny_model, concepts, InferenceConfig(conf=0.3, nms=False, max_imgsz=160), device="cpu"
    )
    full, small = plain.predict(images), capped.predict(images)
    assert mask_grid(240, 320, 160) == (120, 160) and mask_grid(300, 120, 160) == (160, 64)
    assert mask_grid(100, 90, 160) == (100, 90) and mask_grid(20, 20000, 160) == (1, 160)
    for image, a, b in zip(images, full, small, strict=True):
        h, w = image.shape[:2]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert (x.score, x.box, x.query) == (y.score, y.box, y.query)
            assert x.mask_size == (h, w) and y.mask_size == mask_grid(h, w, 160)
            big = decode_rle(x.mask_rle, x.mask_size)
            grid = decode_rle(y.mask_rle, y.mask_size)
            assert y.area == int(grid.sum())
            if y.mask_size == x.mask_size:  # a small image: nothing to cap
                assert y.mask_rle == x.mask_rle
                continue
            down = np.array(Image.fromarray(big).resize(y.mask_size[::-1], Image.NEAREST))
            assert mask_iou(down, grid) >= 0.9


# --------------------------------------------------------------------------- model.dtype


def test_bfloat16_loads_bf16_weights_and_stays_close_to_float32(tiny_checkpoint, knob_images):
    """model.dtype="bfloat16": the weights themselves become bfloat16 (halving their
    memory), normalisation layers excepted, and the forward runs under bf16 autocast;
    the output keeps its shape and stays within bf16 noise of float32 on the tiny model
    (measured: scores within ~0.02, mask IoU of matched detections ~0.9 and up; README)."""
    from sam3ray import load_sam3_image_model

    runs, engines = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = load_sam3_image_model(tiny_checkpoint, device="cpu")  # the engine owns it
        engines[dtype] = engine = Sam3Engine(model, KNOB_CONCEPTS, RAW, device="cpu", dtype=dtype)
        assert engine.dtype == dtype
        runs[dtype] = engine.predict(knob_images)
    params = dict(engines["bfloat16"].model.named_parameters())
    norms = {n for n, m in engines["bfloat16"].model.named_modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))}  # fmt: skip
    for name, p in params.items():
        in_norm = name.rsplit(".", 1)[0] in norms
        assert p.dtype == (torch.float32 if in_norm else torch.bfloat16), name
    assert norms and sum(p.numel() for n, p in params.items() if p.dtype == torch.bfloat16) > (
        0.99 * sum(p.numel() for p in params.values())
    )
    assert all(p.dtype == torch.float32 for p in engines["float32"].model.parameters())
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    diffs, ious = [], []
    for a, b, image in zip(fp32, bf16, knob_images, strict=True):
        h, w = image.shape[:2]
        assert len(a) == len(b) == 60
        assert Counter(d.query for d in a) == Counter(d.query for d in b)
        for d in b:
            assert math.isfinite(d.score) and 0.0 <= d.score <= 1.0
            assert 0 <= d.box[0] <= d.box[2] <= w and 0 <= d.box[1] <= d.box[3] <= h
            assert d.mask_size == (h, w)
        for query in {d.query for d in a}:  # match detections by rank within a query
            qa = sorted((d for d in a if d.query == query), key=lambda d: -d.score)
            qb = sorted((d for d in b if d.query == query), key=lambda d: -d.score)
            diffs += [abs(x.score - y.score) for x, y in zip(qa, qb)]
            ious += [rle_iou(x.mask_rle, y.mask_rle, x.mask_size) for x, y in zip(qa, qb)]
    assert max(diffs) <= 0.05  # bf16 rounding, not a different model
    assert max(diffs) > 0  # and bf16 really ran: the numbers moved
    assert float(np.median(ious)) >= 0.8


# --------------------------------------------------------------------------- bad input

BAD_CONCEPTS = ConceptSet((Concept(CAT, "cat", ("cat",)), Concept(THING, "thing", ())))


def _rgb(h: int = 64, w: int = 80) -> np.ndarray:
    return scene(1, (h, w))


BAD_INPUTS = {
    "empty batch": ([], None, "empty batch"),
    "grayscale array": ([_rgb(), _rgb()[..., 0]], None, r"image 1: .*RGB"),
    "RGBA array": ([_rgb(), _rgb(), np.zeros((64, 80, 4), np.uint8)], None, r"image 2: .*RGB"),
    "float array": ([_rgb().astype(np.float32)], None, r"image 0: .*uint8"),
    "not an array": ([_rgb(), Image.fromarray(_rgb())], None, r"image 1: .*numpy"),
    "box outside the image": (
        [_rgb(), _rgb()],
        [None, {THING: [Exemplar("box", (10, 10, 90, 50))]}],
        rf"image 1, class {THING}: .*outside the 80x64 image",
    ),
    "box with x1 < x0": (
        [_rgb()],
        [{THING: [Exemplar("box", (50, 10, 20, 40))]}],
        rf"image 0, class {THING}: .*x1 > x0",
    ),
    "NaN coordinate": (
        [_rgb(), _rgb()],
        [None, {CAT: [Exemplar("point", (float("nan"), 3.0))]}],
        rf"image 1, class {CAT}: .*finite",
    ),
    "unknown class": (
        [_rgb()],
        [{"no-such-class": [Exemplar("point", (3.0, 3.0))]}],
        r"image 0: .*unknown class_id no-such-class",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_item_before_any_work(tiny_model, calls, case):
    images, exemplars, message = BAD_INPUTS[case]
    engine = Sam3Engine(tiny_model, BAD_CONCEPTS, device="cpu")
    with pytest.raises(ValueError, match=message):
        engine.predict(images, exemplars)
    # No partial work or output: the model never ran and no counter moved.
    assert calls.vision == [] and calls.text == []
    assert engine.stats.images == engine.stats.backbone_images == engine.stats.queries == 0
    # The same engine still serves a good batch afterwards.
    assert len(engine.predict([_rgb()])) == 1


def test_zero_concepts_is_refused(tiny_model):
    with pytest.raises(ValueError, match="concept set is empty"):
        Sam3Engine(tiny_model, ConceptSet(()), device="cpu")
