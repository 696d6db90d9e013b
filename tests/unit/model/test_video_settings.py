"""The video path honours every model and inference setting a job gives it.

``model.dtype`` is checked where the fidelity to the official model is
(test_video_model.py: the tracking stage equals the official video model in
float32 and in bfloat16). Here: ``model.compile``, ``inference.max_det``,
``inference.nms``/``iou`` (synonym tracks) and negative exemplar boxes, each
through the tracking stage on a short shard and, where there is a pure
function behind it, against that function on hand-made detections.
"""

from __future__ import annotations

from collections import Counter, defaultdict
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
from sam3ray.core.masks import encode_rle, rle_iou
from sam3ray.core.shards import InputRef, Shard
from sam3ray.core.types import Concept, ConceptSet, Detection, Exemplar
from sam3ray.demo.videos import write_video
from sam3ray.model.video_queries import (
    VideoQuery,
    build_video_queries,
    cap_per_frame,
    merge_tracks,
)
from sam3ray.plan.video import video_shards
from sam3ray.sources.prompts import GeometricPrompts
from sam3ray.stages.tasks import ShardTask
from sam3ray.stages.track import TrackStage
from sam3ray.storage.location import Location

DISC = "0b0c7f5e-0000-4000-8000-0000000000a1"
THING = "0b0c7f5e-0000-4000-8000-0000000000a2"
#: One class, two synonyms: two queries that find the same disc.
SYNONYMS = ConceptSet((Concept(DISC, "disc", ("blue disc", "circle")),))
VIDEO = VideoConfig(shard_frames=12, overlap_frames=4, frame_stride=1)
POS = (130.0, 10.0, 170.0, 60.0)  # around the disc on source frame 12
NEG = (10.0, 80.0, 60.0, 130.0)  # the lower-left corner: "not this"


def fresh(stage: TrackStage, shard: Shard) -> ShardTask:
    """A shard's first task: every concept of the stage."""
    return ShardTask(shard, tuple(c.class_id for c in stage.concepts))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[InputRef, Shard]:
    """A 40-frame clip and a cheap 6-frame shard of it (source frames 10..15)."""
    from sam3ray.sources.video import probe_video

    path = str(write_video(tmp_path_factory.mktemp("v") / "clip.mp4", n_frames=40))
    ref = InputRef.of(path)
    base = video_shards(ref, probe_video(Location(path)), VIDEO)[1]  # frames 8..19
    span = replace(base.span, frames=tuple(range(10, 16)), owned=(10, 16))
    return ref, replace(base, span=span)


def make_stage(ckpt, ref, concepts, inference, *, geometric=None, compile=False) -> TrackStage:
    stage = TrackStage(
        ModelConfig(checkpoint=ckpt, device="cpu", dtype="float32", compile=compile),
        inference,
        VIDEO,
        InputConfig(uris=[ref.uri]),
        ResourcesConfig(gpus_per_actor=0),
        concepts,
        run_id="r",
        geometric=geometric,
    )
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def synonym_stage(video_ckpt, clip):
    return make_stage(video_ckpt, clip[0], SYNONYMS, InferenceConfig(conf=0.0, nms=False))


@pytest.fixture(scope="module")
def raw(synonym_stage, clip):
    """The stage's own output without dedupe or cap (the reference for the knobs)."""
    result = synonym_stage.process(fresh(synonym_stage, clip[1]))
    assert result.images.column("status").to_pylist() == ["ok"]
    return result.staging.to_pylist()


def run_with(stage: TrackStage, shard: Shard, monkeypatch, **settings) -> list[dict]:
    """The stage's staging rows with ``inference`` settings changed (same loaded model)."""
    monkeypatch.setattr(stage, "inference", InferenceConfig(conf=0.0, **settings))
    result = stage.process(fresh(stage, shard))
    assert result.images.column("status").to_pylist() == ["ok"]
    n_owned = result.detections.num_rows  # the shard owns all its frames here
    assert n_owned == result.staging.num_rows == result.images["n_detections"][0].as_py()
    return result.staging.to_pylist()


def key(row: dict) -> tuple:
    return (row["frame_index"], row["track_id"], row["query"], row["score"], row["mask_rle"])


def tracks(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["track_id"]].append(r)
    return out


def mean_track_iou(a: list[dict], b: list[dict]) -> float | None:
    on = {r["frame_index"]: r for r in a}
    ious = [
        rle_iou(on[r["frame_index"]]["mask_rle"], r["mask_rle"], tuple(r["mask_size"]))
        for r in b
        if r["frame_index"] in on
    ]
    return sum(ious) / len(ious) if ious else None


# --------------------------------------------------------------------------- model.compile


def test_compile_wraps_the_detector_backbone_with_torch_compile(video_ckpt, clip):
    """model.compile=True reaches the video model (wrapped, not run: compiling is slow)."""
    from sam3ray.model.video import VideoTracker

    plain = VideoTracker.from_checkpoint(video_ckpt, device="cpu")
    assert not hasattr(plain.model.detector.backbone.forward_image, "_torchdynamo_orig_callable")

    tracker = VideoTracker.from_checkpoint(video_ckpt, device="cpu", compile=True)
    backbone = tracker.model.detector.backbone
    wrapped = backbone.forward_image
    assert wrapped._torchdynamo_orig_callable == type(backbone).forward_image.__get__(backbone)

    # and from the job's model section, through the stage
    stage = make_stage(video_ckpt, clip[0], SYNONYMS, InferenceConfig(), compile=True)
    staged = stage.tracker.model.detector.backbone
    assert staged.forward_image._torchdynamo_orig_callable.__self__ is staged


# --------------------------------------------------------------------------- inference.max_det


def _det(frame: int, track: int, score: float) -> Detection:
    m = np.zeros((8, 8), bool)
    m[track % 8, :] = True
    rle, area = encode_rle(m)
    return Detection(
        DISC, "disc", 'text:"d"', score, (0, 0, 8, 1), rle, (8, 8), area, frame=frame, track=track
    )


def test_cap_per_frame_keeps_the_best_scores_of_each_frame_in_order():
    dets = [
        _det(0, 0, 0.2), _det(0, 1, 0.9), _det(0, 2, 0.5), _det(0, 3, 0.9),
        _det(1, 0, 0.1), _det(1, 1, 0.3),
        _det(2, 4, 0.7),
    ]  # fmt: skip
    got = cap_per_frame(dets, 2)
    # frame 0: 0.9, 0.9 (tie: earlier track first in rank, both kept); frame 1: both; frame 2: one
    assert [(d.frame, d.track) for d in got] == [(0, 1), (0, 3), (1, 0), (1, 1), (2, 4)]
    one = cap_per_frame(dets, 1)
    assert [(d.frame, d.track) for d in one] == [(0, 1), (1, 1), (2, 4)]  # the tie: earlier track
    assert cap_per_frame(dets, 100) == dets
    # merge_tracks applies the cap even without dedupe
    q = [VideoQuery(DISC, "disc", 'text:"d"', "d")]
    assert merge_tracks(dets, q, InferenceConfig(nms=False, max_det=1)) == one


def test_max_det_caps_detections_per_frame_keeping_the_best(synonym_stage, clip, raw, monkeypatch):
    per_frame = Counter(r["frame_index"] for r in raw)
    assert per_frame and min(per_frame.values()) >= 2, "nothing to cap: the test would be vacuous"
    capped = run_with(synonym_stage, clip[1], monkeypatch, nms=False, max_det=1)
    assert Counter(r["frame_index"] for r in capped) == dict.fromkeys(per_frame, 1)
    for frame in per_frame:
        best = max(r["score"] for r in raw if r["frame_index"] == frame)
        (kept,) = [r for r in capped if r["frame_index"] == frame]
        assert kept["score"] == best
    assert {key(r) for r in capped} <= {key(r) for r in raw}


# --------------------------------------------------------------------------- inference.nms / iou


def test_nms_false_keeps_synonym_tracks_and_nms_true_dedupes_them_at_iou(
    synonym_stage, clip, raw, monkeypatch
):
    by_track = tracks(raw)
    queries = {t: rows[0]["query"] for t, rows in by_track.items()}
    assert set(queries.values()) == {'text:"blue disc"', 'text:"circle"'}
    first = [t for t, q in queries.items() if q == 'text:"blue disc"']
    later = [t for t, q in queries.items() if q == 'text:"circle"']
    overlap = {(a, b): mean_track_iou(by_track[a], by_track[b]) for a in first for b in later}
    repeats = {b for (a, b), iou in overlap.items() if iou is not None and iou >= 0.7}
    assert repeats, "no synonym track repeats another: dedupe would have nothing to do"
    strict_iou = 0.99
    assert all(iou < strict_iou for iou in overlap.values() if iou is not None)

    # nms=False: every synonym's tracks stay (this is the raw run, re-run explicitly)
    kept_all = run_with(synonym_stage, clip[1], monkeypatch, nms=False)
    assert sorted(map(key, kept_all)) == sorted(map(key, raw))

    # nms=True at iou 0.7: the later synonym's repeating tracks go, all else stays
    deduped = run_with(synonym_stage, clip[1], monkeypatch, nms=True, iou=0.7)
    want = [r for r in raw if r["track_id"] not in repeats]
    assert sorted(map(key, deduped)) == sorted(map(key, want))
    assert len(deduped) < len(raw)

    # nms=True with an iou above their overlap: nothing repeats, nothing goes
    strict = run_with(synonym_stage, clip[1], monkeypatch, nms=True, iou=strict_iou)
    assert sorted(map(key, strict)) == sorted(map(key, raw))


# --------------------------------------------------------------------------- negative boxes


def test_build_video_queries_gives_each_boxed_frame_its_own_query_per_text():
    ex = {
        DISC: [(4, Exemplar("box", POS)), (1, Exemplar("box", NEG, positive=False))],
        THING: [(4, Exemplar("box", NEG, positive=False))],
    }
    concepts = ConceptSet((Concept(DISC, "disc", ("blue disc",)), Concept(THING, "thing", ())))
    qs = build_video_queries(concepts, ex, 0.3, source_frames=[10, 11, 12, 13, 14, 15])
    assert [(q.label, q.frame, q.boxes) for q in qs] == [
        ('text:"blue disc" -1 box @11', 1, ((*NEG, False),)),
        ('text:"blue disc" +1 box @14', 4, ((*POS, True),)),
        ("visual -1 box @14", 4, ((*NEG, False),)),
    ]
    assert [q.text for q in qs] == ["blue disc", "blue disc", None]


def test_negative_boxes_reach_add_prompt_and_name_the_query(video_ckpt, clip, monkeypatch):
    """A negative box of one class on source frame 12 and a positive one on frame 14: one
    query each (the video model takes one box per prompted frame), each add_prompt gets its
    box with its own label, and the query column says which."""
    ref, shard = clip
    geo = GeometricPrompts(
        [
            (None, ref.image_id, DISC, Exemplar("box", NEG, False, 12)),
            (None, ref.image_id, DISC, Exemplar("box", POS, True, 14)),
        ]
    )
    concepts = ConceptSet((Concept(DISC, "disc", ("blue disc",)),))
    stage = make_stage(video_ckpt, ref, concepts, InferenceConfig(conf=0.0), geometric=geo)
    model = stage.tracker.model
    calls, original = [], model.add_prompt

    def spy(state, **kwargs):
        calls.append(kwargs)
        return original(state, **kwargs)

    monkeypatch.setattr(model, "add_prompt", spy)
    result = stage.process(fresh(stage, shard))

    h, w = 144, 192
    assert [(c["frame_idx"], c["text_str"]) for c in calls] == [(2, "blue disc"), (4, "blue disc")]
    for call, (x0, y0, x1, y1), label in zip(calls, (NEG, POS), (0, 1), strict=True):
        want = torch.tensor([[x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h]])
        assert torch.allclose(call["boxes_xywh"].float(), want)
        assert call["box_labels"].tolist() == [label]

    row = result.images.to_pylist()[0]
    assert (row["status"], row["error"]) == ("ok", None)
    assert result.staging.num_rows > 0
    assert set(result.staging.column("query").to_pylist()) <= {
        'text:"blue disc" -1 box @12',
        'text:"blue disc" +1 box @14',
    }


def test_two_boxes_of_a_class_on_one_video_frame_are_refused_naming_the_rows():
    """sam3's add_prompt keeps one box per prompted frame: the planner refuses a second
    (also when frame_stride folds two source frames onto one sampled frame)."""
    from sam3ray.core.errors import PromptTableError
    from sam3ray.sources.prompts import check_video_exemplars

    vid = "0123456789abcdef"
    entries = [
        (None, vid, DISC, Exemplar("box", POS, True, 12), 2),
        (None, vid, DISC, Exemplar("box", NEG, False, 13), 3),
        (None, vid, DISC, Exemplar("point", (5.0, 6.0), True, 12), 4),
    ]
    geo = GeometricPrompts(entries, source="ex.csv")
    check_video_exemplars(geo, "s3://b/v.mp4", vid, frame_stride=1)  # frames 12, 13: fine
    with pytest.raises(PromptTableError) as refused:
        check_video_exemplars(geo, "s3://b/v.mp4", vid, frame_stride=2)  # both -> frame 6
    message = str(refused.value)
    assert message.startswith("ex.csv row 3: a second box of class_id") and "row 2" in message
    with pytest.raises(ValueError, match="one box per prompted frame"):
        from sam3ray.model.video_queries import build_video_queries

        two = {DISC: [(1, Exemplar("box", POS, True)), (1, Exemplar("box", NEG, False))]}
        build_video_queries(ConceptSet((Concept(DISC, "disc", ("blue disc",)),)), two, 0.0)
