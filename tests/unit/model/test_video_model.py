"""The SAM 3 video model: architecture, tiny checkpoint, fidelity of the tracking stage.

Fidelity reference: the official ``Sam3VideoInferenceWithInstanceInteractivity``
driven directly through its own API (``init_state`` on PIL frames decoded
independently, ``add_prompt``, ``propagate_in_video``), same weights. On a CPU
the official code only runs inside ``video_compat.video_inference`` (CUDA
hard-coding, float16 frames), so both sides run in it, in the same ``model.dtype``.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from sam3ray.config import (
    InferenceConfig,
    InputConfig,
    ModelConfig,
    ResourcesConfig,
    VideoConfig,
)
from sam3ray.core.shards import InputRef, Shard
from sam3ray.core.types import Concept, ConceptSet, Detection, Exemplar
from sam3ray.demo.videos import write_video
from sam3ray.plan.video import error_shard, video_shards
from sam3ray.sources.prompts import GeometricPrompts
from sam3ray.stages.tasks import ShardTask
from sam3ray.stages.track import TrackStage
from sam3ray.storage.location import Location

DISC = "0b0c7f5e-0000-4000-8000-0000000000a1"
THING = "0b0c7f5e-0000-4000-8000-0000000000a2"
CONCEPTS = ConceptSet((Concept(DISC, "disc", ("blue disc",)), Concept(THING, "thing", ())))
BOX = (130.0, 10.0, 170.0, 60.0)  # around the disc on source frame 12
#: 12-frame shards overlapping by 4 (shard 1 = source frames 8..19).
VIDEO = VideoConfig(shard_frames=12, overlap_frames=4, frame_stride=1)


def fresh(stage: TrackStage, shard: Shard) -> ShardTask:
    """A shard's first task: every concept of the stage."""
    return ShardTask(shard, tuple(c.class_id for c in stage.concepts))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from sam3ray.sources.video import probe_video

    path = str(write_video(tmp_path_factory.mktemp("v") / "clip.mp4", n_frames=40))
    ref = InputRef.of(path)
    return ref, video_shards(ref, probe_video(Location(path)), VIDEO)


def make_stage(
    ckpt: str,
    ref: InputRef,
    geometric: GeometricPrompts | None,
    *,
    dtype: str = "float32",
    inference: InferenceConfig | None = None,
    concepts: ConceptSet = CONCEPTS,
) -> TrackStage:
    stage = TrackStage(
        ModelConfig(checkpoint=ckpt, device="cpu", dtype=dtype),
        inference or InferenceConfig(conf=0.0),
        VIDEO,
        InputConfig(uris=[ref.uri]),
        ResourcesConfig(gpus_per_actor=0),
        concepts,
        run_id="r",
        geometric=geometric,
    )
    stage.setup()
    return stage


def box_prompt(ref: InputRef) -> GeometricPrompts:
    return GeometricPrompts([(None, ref.image_id, THING, Exemplar("box", BOX, True, 12))])


@pytest.fixture(scope="module")
def stage(video_ckpt, clip):
    """The tracking stage as a CPU job runs it (model.dtype float32)."""
    return make_stage(video_ckpt, clip[0], box_prompt(clip[0]))


@pytest.fixture(scope="module")
def bf16_stage(video_ckpt, clip):
    """The same stage with model.dtype bfloat16 (bf16 autocast on the CPU)."""
    return make_stage(video_ckpt, clip[0], box_prompt(clip[0]), dtype="bfloat16")


def test_full_video_arch_matches_the_official_builder_on_the_meta_device(meta_device):
    from sam3ray.model import compat
    from sam3ray.model.video_arch import Sam3VideoArch, build_video_model

    compat.ensure()
    import sam3.model_builder as official

    with meta_device():
        ours = build_video_model(Sam3VideoArch.full())
        theirs = official.build_sam3_video_model(
            bpe_path=compat.bpe_path(), load_from_HF=False, device="meta"
        )
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert mine == want
    assert type(ours) is type(theirs) and type(ours.tracker) is type(theirs.tracker)


def test_tiny_video_checkpoint_has_the_official_layout_and_its_detector_loads_as_image(
    video_ckpt,
):
    from sam3ray.model.loader import load_checkpoint_into_new_model

    ckpt = torch.load(video_ckpt, map_location="cpu", weights_only=True)
    keys = set(ckpt["model"])
    assert keys == {k for k in keys if k.startswith(("detector.", "tracker."))}
    assert any(k.startswith("tracker.") for k in keys)
    assert ckpt["sam3ray"]["kind"] == "tiny-random-video"
    model, info = load_checkpoint_into_new_model(video_ckpt)
    assert info.arch.num_queries == 8


def official_run(
    model, frames: list[np.ndarray], text, box, frame_idx, h, w, dtype: str = "bfloat16"
):
    """The official video model on PIL frames, one prompt, in ``model.dtype`` ``dtype``.

    For float32 the frames ``init_state`` built (float16, like sam3's loader) are
    upcast in the session's input batch, as the tracking stage does with its own.
    """
    from PIL import Image

    from sam3ray.model import video_compat

    out = {}
    state = model.init_state([Image.fromarray(f) for f in frames], offload_video_to_cpu=True)
    batch = state["input_batch"]
    assert batch.img_batch.dtype == torch.float16  # where init_state keeps the frames
    if dtype == "float32":
        batch.img_batch = batch.img_batch.float()
    with video_compat.video_inference("cpu", dtype):
        kwargs = {"text_str": text or "visual"}
        if box is not None:
            x0, y0, x1, y1 = box
            kwargs["boxes_xywh"] = torch.tensor([[x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h]])
            kwargs["box_labels"] = torch.tensor([1])
        model.add_prompt(state, frame_idx=frame_idx, **kwargs)
        for reverse in (False, True) if frame_idx else (False,):
            for idx, res in model.propagate_in_video(state, frame_idx, None, reverse):
                out[idx] = res
    return out


def decoded_frames(uri: str, frames: tuple[int, ...]) -> list[np.ndarray]:
    """The shard's frames decoded independently (PyAV, whole file)."""
    import av

    with av.open(uri) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    return decoded[frames[0] : frames[-1] + 1]


def official_rows(model, ref: InputRef, shard: Shard, dtype: str) -> list[tuple]:
    """(source frame, track, score, mask) the official model finds for the stage's two
    queries (the text, and the box on shard frame 4), tracks numbered like the stage's."""
    from sam3ray.core.masks import encode_rle

    frames = decoded_frames(ref.uri, shard.span.frames)
    want, next_track = [], 0
    for text, box, local in (("blue disc", None, 0), (None, BOX, 4)):
        res = official_run(model, frames, text, box, local, 144, 192, dtype)
        ids = sorted({int(i) for r in res.values() for i in r["out_obj_ids"]})
        rank = {obj: next_track + n for n, obj in enumerate(ids)}
        next_track += len(ids)
        for idx, r in res.items():
            for obj, p, m in zip(r["out_obj_ids"], r["out_probs"], r["out_binary_masks"]):
                rle, area = encode_rle(m)
                if area:
                    want.append((shard.span.frames[idx], rank[int(obj)], round(float(p), 6), rle))
    return want


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tracking_stage_equals_the_official_video_model_on_one_shard(
    stage, bf16_stage, clip, dtype
):
    """model.dtype is honoured: in each dtype the stage equals the official model run in
    that dtype, and the two dtypes really differ (the setting is not ignored)."""
    ref, shards = clip
    shard = shards[1]  # frames 8..19: a seek, and the box exemplar on source frame 12
    runner = bf16_stage if dtype == "bfloat16" else stage
    assert runner.tracker.dtype == dtype
    got = runner.process(fresh(runner, shard))
    assert got.images.column("status").to_pylist() == ["ok"]
    table = got.staging.to_pylist()

    want = official_rows(runner.tracker.model, ref, shard, dtype)
    mine = [(r["frame_index"], r["track_id"], round(r["score"], 6), r["mask_rle"]) for r in table]
    assert len(want) > 0, "the reference found nothing: a vacuous comparison"
    assert sorted(mine) == sorted(want)
    assert {r["query"] for r in table} == {'text:"blue disc"', "visual +1 box @12"}
    # Not the same run under another name: the other dtype scores differently.
    other = stage if dtype == "bfloat16" else bf16_stage
    others = other.process(fresh(other, shard)).staging.column("score").to_pylist()
    assert sorted(others) != sorted(r["score"] for r in table)


def test_image_features_are_computed_once_per_frame_for_every_query(stage, clip, monkeypatch):
    """Two queries (a text, and a box on shard frame 4, so a forward and a reverse pass)
    over 12 frames: with the feature cache the backbone sees each frame once; without,
    once per visit; with a budget for a third of the frames, in between. The detections
    are identical every time."""
    backbone = stage.tracker.model.detector.backbone
    original, seen = backbone.forward_image, []

    def counting(images):
        seen.append(images.shape[0])
        return original(images)

    def run(budget: int | None = None):
        if budget is not None:
            monkeypatch.setattr(stage.tracker, "feature_cache_bytes", budget)
        seen.clear()
        table = stage.process(fresh(stage, shard)).staging.drop_columns(["created_at"])
        return table, sum(seen), dict(stage.tracker.last_feature_cache)

    monkeypatch.setattr(backbone, "forward_image", counting)
    shard = clip[1][1]
    full, n_full, cache = run()
    assert n_full == len(shard.span.frames) == 12 and cache["frames"] == 12
    plain, n_plain, _ = run(0)
    assert n_plain >= 2 * n_full, (n_plain, n_full)
    assert cache["hits"] == n_plain - n_full  # every later visit was served from the cache
    part, n_part, part_cache = run(cache["bytes"] // 3)
    assert 0 < part_cache["frames"] < 12 and n_full < n_part < n_plain
    assert full.num_rows > 0 and full.equals(plain) and full.equals(part)
    assert "_get_img_feats" not in vars(stage.tracker.model.detector), "shim removed"


def test_a_session_never_outlives_its_shard(stage, clip, monkeypatch):
    import sam3ray.model.video as video

    refs = []
    original = video.new_inference_state

    def spy(*args, **kwargs):
        state = original(*args, **kwargs)
        refs.append(weakref.ref(state["input_batch"]))
        return state

    monkeypatch.setattr(video, "new_inference_state", spy)
    stage.process(fresh(stage, clip[1][-1]))
    assert refs and all(r() is None for r in refs), "the inference state was freed"


def test_bad_shards_become_error_rows_without_stopping(stage, clip, monkeypatch):
    from sam3ray.core.errors import DecodeError

    ref, shards = clip
    bad = {
        "probe": error_shard(ref, DecodeError("unsupported_codec", "no decoder")),
        "beyond": _shifted(shards[-1], 400),
        "exemplar": _shifted(shards[0], 0),
    }
    monkeypatch.setattr(
        stage,
        "geometric",
        GeometricPrompts([(None, ref.image_id, THING, Exemplar("box", (0, 0, 500, 10), True, 2))]),
    )
    got = {k: stage.process(fresh(stage, s)).images.to_pylist()[0] for k, s in bad.items()}
    assert got["probe"]["error_reason"] == "unsupported_codec"
    assert got["beyond"]["error_reason"] == "truncated"  # the MP4 header counts 40 frames
    assert got["exemplar"]["error_reason"] == "exemplar_outside_image"
    assert all(g["status"] == "error" and g["n_detections"] == 0 for g in got.values())


def _shifted(shard: Shard, by: int) -> Shard:
    frames = tuple(f + by for f in shard.span.frames)
    span = replace(shard.span, frames=frames, owned=(frames[0], frames[-1] + 1))
    return replace(shard, span=span)


def test_video_compat_shims_are_scoped_and_guard_empty_hole_filling():
    from sam3ray.model import video_compat

    video_compat.ensure()
    import sam3.model.sam3_video_base as base

    assert base.fill_holes_in_mask_scores(torch.zeros(0, 1, 31, 33), 16).shape == (0, 1, 31, 33)
    with video_compat.video_inference("cpu"):
        x = torch.ones(2)
        assert x.cuda() is x and x.to(torch.device("cuda"), non_blocking=True).device.type == "cpu"
        assert torch.zeros(1, device="cuda").device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")  # outside the context nothing is remapped


def test_queries_follow_the_video_api_and_synonym_tracks_are_merged():
    from sam3ray.core.masks import encode_rle
    from sam3ray.model.video_queries import build_video_queries, dedupe_tracks

    concepts = ConceptSet(
        (Concept(DISC, "disc", ("blue disc", "circle"), 0.6), Concept(THING, "thing", ()))
    )
    points = [(1, Exemplar("point", (5, 6))), (1, Exemplar("point", (7, 8), False))]
    ex = {
        DISC: [(5, Exemplar("box", BOX)), (2, Exemplar("box", BOX, False))],
        THING: [(3, Exemplar("box", BOX)), *points],
    }
    qs = build_video_queries(concepts, ex, 0.4)
    assert [(q.label, q.frame, q.min_score) for q in qs] == [
        ('text:"blue disc" -1 box @2', 2, 0.6),
        ('text:"blue disc" +1 box @5', 5, 0.6),
        ('text:"circle" -1 box @2', 2, 0.6),
        ('text:"circle" +1 box @5', 5, 0.6),
        ("visual +1 box @3", 3, 0.4),
        ("visual +1 point -1 point @1", 1, 0.4),
    ]
    # negative boxes are carried (labelled False), no longer dropped
    assert qs[0].boxes == ((*BOX, False),) and qs[1].boxes == ((*BOX, True),)
    assert qs[-1].points == ((5, 6, True), (7, 8, False)) and qs[-1].text is None

    m = np.zeros((20, 20), bool)
    m[2:12, 2:12] = True
    rle, area = encode_rle(m)

    def det(track, query, frame=0):
        box = (2, 2, 12, 12)
        return Detection(
            DISC, "disc", query, 0.9, box, rle, (20, 20), area, frame=frame, track=track
        )

    dets = [det(0, qs[0].label), det(1, qs[1].label), det(2, qs[1].label, frame=1)]
    assert [d.track for d in dedupe_tracks(dets, qs, 0.7)] == [0, 2], "a repeat is dropped"


def test_point_prompts_add_an_object_through_the_tracker(stage, clip, monkeypatch):
    from sam3ray.model.video_queries import build_video_queries

    ref, shards = clip
    geo = GeometricPrompts([(None, ref.image_id, THING, Exemplar("point", (150, 35), True, 3))])
    monkeypatch.setattr(stage, "geometric", geo)
    first = shards[0]
    shard = replace(first, span=replace(first.span, frames=tuple(range(6)), owned=(0, 6)))
    table = stage.process(fresh(stage, shard)).staging.to_pylist()
    pts = [r for r in table if r["query"] == "visual +1 point @3"]
    assert pts and {r["score"] for r in pts} == {1.0}, "the clicked object is tracked"
    assert build_video_queries(CONCEPTS, None, 0.0)[-1].text == "blue disc"


def test_a_relabel_tracks_only_its_concepts(stage, clip):
    """A task that relabels one concept of a committed video shard prompts that concept
    only; its tracks are the ones a full run finds for it; a drop-only task tracks nothing."""
    base = clip[1][1]  # 6 of its frames (10..15) keep it cheap; the box is on frame 12
    shard = replace(base, span=replace(base.span, frames=tuple(range(10, 16)), owned=(10, 16)))
    full = stage.process(fresh(stage, shard)).staging
    relabel = ShardTask(shard, (THING,), ((DISC, "a"), (THING, "b")), fresh=False, first=False)
    again = stage.process(relabel)
    assert set(again.staging.column("class_id").to_pylist()) == {THING}
    assert again.images.column("status").to_pylist() == ["ok"]

    def keys(table):
        return sorted(
            (r["frame_index"], r["query"], round(r["score"], 5), r["mask_rle"])
            for r in table.to_pylist()
            if r["class_id"] == THING
        )

    assert keys(full) and keys(again.staging) == keys(full)
    assert set(full.column("class_id").to_pylist()) == {DISC, THING}, "the full run has both"
    drop = ShardTask(shard, (), ((THING, "b"),), drop=(DISC,), fresh=False, first=False)
    nothing = stage.process(drop)
    assert nothing.images.num_rows == nothing.detections.num_rows == 0
