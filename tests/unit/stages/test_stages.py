"""The image stages without Ray: decode -> segment -> commit, called directly.

The runner's Ray adapter only moves these stages' typed hand-offs between
processes (pickled), so what is checked here is what a job does per shard.
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from sam3ray import Concept, ConceptSet, InferenceConfig, ModelConfig, Sam3Engine
from sam3ray.config import InputConfig, ResourcesConfig
from sam3ray.core.ids import input_id
from sam3ray.core.shards import Shard, VideoInfo, VideoSpan
from sam3ray.output.layout import detections_path, images_path, marker_path
from sam3ray.output.markers import read_marker
from sam3ray.output.parquet import read_table
from sam3ray.output.state import commit_key
from sam3ray.plan.shards import image_shard_id
from sam3ray.stages.commit import CommitStage
from sam3ray.stages.decode import DecodeStage
from sam3ray.stages.segment import SegmentStage
from sam3ray.stages.tasks import (
    CommitSummary,
    DecodedShard,
    ShardResult,
    ShardTask,
    WorkerInfo,
)
from sam3ray.storage.location import Location
from tests.support.images import encode, scene
from tests.support.jobs import CAT, PERSON

CONCEPTS = ConceptSet(
    (Concept(CAT, "cat", ("cat", "kitten")), Concept(PERSON, "person", ("person",)))
)
#: max_imgsz below the images' long sides: decode shrinks, rows keep original pixels.
INFERENCE = InferenceConfig(conf=0.3, iou=0.7, nms=True, max_det=20, max_imgsz=100)
SIZES = [(96, 128), (120, 90), (64, 64)]  # (h, w); the corrupt file sits second
RUN = "run-1"
#: The shard's per-concept fingerprints once its task commits.
PRINTS = tuple(sorted({CAT: "fp-cat", PERSON: "fp-person"}.items()))
#: Columns that carry what the model found and where (created_at is a wall-clock stamp).
DET_COLUMNS = (
    "image_id", "uri", "class_id", "concept", "query", "score", "box", "mask_rle",
    "mask_size", "area", "width", "height", "model", "frame_index", "track_id",
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread avoids oversubscription stalls."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Recorder:
    """A Metrics that remembers every call (the stages' only side channel)."""

    def __init__(self) -> None:
        self.images: list[tuple[str, str | None]] = []
        self.detections: Counter[str] = Counter()
        self.latencies: list[float] = []

    def record_image(self, status: str, reason: str | None = None) -> None:
        self.images.append((status, reason))

    def record_detections(self, concept: str, n: int) -> None:
        self.detections[concept] += n

    def record_latency(self, ms: float) -> None:
        self.latencies.append(ms)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three PNG scenes and one corrupt PNG (truncated), as (uris, source arrays or None)."""
    folder = tmp_path_factory.mktemp("imgs")
    uris, arrays = [], []
    for i, size in enumerate(SIZES):
        img = scene(40 + i, size)
        path = folder / f"img-{i}.png"
        path.write_bytes(encode(img, "PNG"))
        uris.append(str(path))
        arrays.append(img)
        if i == 0:
            bad = folder / "img-0b-corrupt.png"
            data = encode(scene(99, (80, 80)), "PNG")
            bad.write_bytes(data[: len(data) // 2])
            uris.append(str(bad))
            arrays.append(None)
    return uris, arrays


@pytest.fixture(scope="module")
def shard(inputs) -> Shard:
    uris = tuple(inputs[0])
    ids = tuple(input_id(u) for u in uris)
    return Shard(image_shard_id(ids), "image", uris, ids)


def fresh(shard: Shard, **kw) -> ShardTask:
    """The shard's first task: every concept."""
    return ShardTask(shard, (CAT, PERSON), PRINTS, **kw)


@pytest.fixture(scope="module")
def decoded(inputs, shard) -> DecodedShard:
    stage = DecodeStage(
        InputConfig(uris=[str(Path(inputs[0][0]).parent)]), INFERENCE, ResourcesConfig()
    )
    stage.setup()
    return stage.process(fresh(shard, previous_files=("stale.parquet",)))


@pytest.fixture(scope="module")
def segmented(tiny_checkpoint, decoded):
    metrics = Recorder()
    stage = SegmentStage(
        ModelConfig(checkpoint=tiny_checkpoint, device="cpu"),
        INFERENCE,
        ResourcesConfig(gpus_per_actor=0),
        CONCEPTS,
        run_id=RUN,
        metrics=metrics,
    )
    stage.setup()
    return stage, stage.process(decoded), metrics


# --------------------------------------------------------------------------- decode


def test_decode_keeps_every_input_and_turns_the_corrupt_one_into_an_error(inputs, decoded, shard):
    uris, arrays = inputs
    assert decoded.task.shard == shard
    assert decoded.task.previous_files == ("stale.parquet",)
    assert [d.uri for d in decoded.images] == list(uris)
    assert [d.image_id for d in decoded.images] == list(shard.image_ids)
    bad = decoded.images[1]
    assert not bad.ok and bad.error_reason == "truncated"
    assert bad.pixels is None and bad.orig_size is None and bad.error
    for d, src in zip(decoded.images, arrays):
        if src is None:
            continue
        h, w = src.shape[:2]
        assert d.ok and d.error is None and d.orig_size == (h, w)
        assert d.pixels.dtype == np.uint8 and d.pixels.shape[2] == 3
        assert max(d.pixels.shape[:2]) == min(max(h, w), INFERENCE.max_imgsz)
        if max(h, w) <= INFERENCE.max_imgsz:
            assert np.array_equal(d.pixels, src)  # PNG is lossless; nothing to shrink


# --------------------------------------------------------------------------- segment


def test_segment_gives_one_images_row_per_input_and_detections_only_for_ok_ones(
    inputs, shard, segmented
):
    _, result, metrics = segmented
    uris, arrays = inputs
    assert isinstance(result, ShardResult) and result.task.shard == shard
    assert result.staging is None
    img = result.images.to_pylist()
    assert [r["uri"] for r in img] == list(uris)
    assert [r["status"] for r in img] == ["ok", "error", "ok", "ok"]
    assert img[1]["error_reason"] == "truncated" and img[1]["n_detections"] == 0
    assert {r["shard_id"] for r in img} == {shard.shard_id} and {r["run_id"] for r in img} == {RUN}
    for row, src in zip(img, arrays):
        if src is not None:
            assert (row["height"], row["width"]) == src.shape[:2]
            assert row["error"] is None and row["error_reason"] is None
    det = result.detections.to_pylist()
    per_input = Counter(r["image_id"] for r in det)
    assert shard.image_ids[1] not in per_input
    assert [per_input[i] for i in shard.image_ids] == [r["n_detections"] for r in img]
    assert sum(per_input.values()) > 0, "nothing detected: the comparison below is vacuous"
    assert metrics.images == [("ok", None), ("error", "truncated"), ("ok", None), ("ok", None)]
    assert sum(metrics.detections.values()) == len(det) and len(metrics.latencies) == 3


def test_segment_rows_equal_the_engine_run_directly(tiny_checkpoint, inputs, shard, segmented):
    """Decode + segment give exactly what Sam3Engine.predict gives on the source pixels."""
    stage, result, _ = segmented
    uris, arrays = inputs
    engine = Sam3Engine.from_checkpoint(tiny_checkpoint, CONCEPTS, INFERENCE, device="cpu")
    assert engine.model_id == stage.engine.model_id
    ok = [i for i, a in enumerate(arrays) if a is not None]
    found = engine.predict([arrays[i] for i in ok])
    want = []
    for i, dets in zip(ok, found):
        h, w = arrays[i].shape[:2]
        for d in dets:
            want.append(
                {
                    "image_id": shard.image_ids[i], "uri": uris[i], "class_id": d.class_id,
                    "concept": d.concept, "query": d.query, "score": d.score,
                    "box": list(d.box), "mask_rle": d.mask_rle, "mask_size": list(d.mask_size),
                    "area": d.area, "width": w, "height": h, "model": engine.model_id,
                    "frame_index": None, "track_id": None,
                }
            )  # fmt: skip
    got = result.detections.select(list(DET_COLUMNS)).to_pylist()
    assert len(want) > 0
    assert len(got) == len(want)
    for g, w in zip(got, want):  # score and box are stored as float32: compare as such
        assert {k: v for k, v in g.items() if k not in ("score", "box")} == {
            k: v for k, v in w.items() if k not in ("score", "box")
        }
        assert np.float32(g["score"]) == np.float32(w["score"])
        assert np.array_equal(np.float32(g["box"]), np.float32(w["box"]))


def _relabelled(segmented, decoded, monkeypatch) -> tuple[str, pa.Table, ShardResult]:
    """The concept the full run found most of, its rows there, and a relabel of it alone."""
    stage, result, _ = segmented
    monkeypatch.setattr(stage, "metrics", Recorder())
    cid = Counter(result.detections.column("class_id").to_pylist()).most_common(1)[0][0]
    task = ShardTask(decoded.task.shard, (cid,), PRINTS, fresh=False, first=False)
    want = result.detections.filter(pc.equal(result.detections.column("class_id"), cid))
    return cid, want, stage.process(DecodedShard(task, decoded.images))


def _keys(table: pa.Table) -> set[tuple]:
    cols = ("image_id", "query", "score", "area", "mask_rle")
    return {
        (r["image_id"], r["query"], float(np.float32(r["score"])), r["area"], r["mask_rle"])
        for r in table.select(list(cols)).to_pylist()
    }


def test_a_relabel_runs_only_its_concepts(segmented, decoded, monkeypatch):
    """A task that relabels one concept of a committed shard asks the engine for that
    concept only, finds (at least) what the full run found of it, and counts its rows."""
    cid, want, again = _relabelled(segmented, decoded, monkeypatch)
    assert set(again.detections.column("class_id").to_pylist()) == {cid}
    assert want.num_rows > 0 and _keys(want) <= _keys(again.detections)
    per_input = Counter(again.detections.column("image_id").to_pylist())
    assert max(per_input.values()) <= INFERENCE.max_det
    rows = again.images.to_pylist()
    assert [r["n_detections"] for r in rows] == [per_input[r["image_id"]] for r in rows]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok"]


@pytest.mark.xfail(
    strict=True,
    reason="known design gap: inference.max_det caps detections per image over ALL concepts "
    "(model.engine._finish), so one concept relabelled alone keeps more rows than a full run: "
    "labels depend on the order concepts were added, and an image can exceed max_det",
)
def test_a_relabel_gives_the_labels_a_full_run_gives(segmented, decoded, monkeypatch):
    _, want, again = _relabelled(segmented, decoded, monkeypatch)
    assert _keys(again.detections) == _keys(want)


def test_a_drop_only_task_reads_and_labels_nothing(inputs, shard, segmented):
    stage, _, _ = segmented
    task = ShardTask(shard, (), ((PERSON, "fp-person"),), drop=(CAT,), fresh=False, first=False)
    decoder = DecodeStage(InputConfig(uris=["/nowhere"]), INFERENCE, ResourcesConfig())
    decoded = decoder.process(task)
    assert decoded.images == () and decoded.task == task
    result = stage.process(decoded)
    assert result.images.num_rows == result.detections.num_rows == 0


# --------------------------------------------------------------------------- commit


def test_commit_writes_the_shard_marker_last_and_summarises_it(
    tmp_path, shard, segmented, monkeypatch
):
    _, result, _ = segmented
    writes: list[str] = []
    original = Location.write_bytes

    def recording(self, data, *args, **kwargs):
        writes.append(self.uri)
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Location, "write_bytes", recording)
    out = Location(str(tmp_path / "out"))
    stage = CommitStage(out, RUN)
    stage.setup()
    summary = stage.process(result)

    det = result.detections
    classes = sorted(set(det.column("class_id").to_pylist()))
    expected = [out.child(detections_path(c, shard.shard_id)).uri for c in classes]
    expected += [out.child(images_path(shard.shard_id)).uri]
    assert sorted(writes[:-2]) == sorted(expected)
    assert writes[-2] == out.child(marker_path(shard.shard_id)).uri  # then the marker,
    assert writes[-1] == out.child(commit_key(RUN, shard.shard_id, errors=True)).uri  # the key

    marker = read_marker(out, shard.shard_id)
    assert (marker.n_inputs, marker.n_ok, marker.n_error) == (4, 3, 1)
    assert marker.n_detections == det.num_rows
    assert marker.prints == PRINTS
    assert marker.run_id == RUN
    images = read_table(out.child(images_path(shard.shard_id)))
    assert sorted(images.column("uri").to_pylist()) == sorted(shard.uris)
    n_written = sum(
        read_table(out.child(detections_path(c, shard.shard_id))).num_rows for c in classes
    )
    assert n_written == det.num_rows

    assert isinstance(summary, CommitSummary)
    assert summary.shard_id == shard.shard_id and summary.kind == "image"
    assert (summary.n_inputs, summary.n_ok, summary.n_error) == (4, 3, 1)
    assert summary.n_detections == det.num_rows > 0
    assert summary.errors_by_reason == {"truncated": 1}
    assert summary.detections_by_concept == dict(Counter(det.column("concept").to_pylist()))
    assert summary.worker == result.worker and summary.finished_at == result.finished_at


# --------------------------------------------------------------------------- hand-offs


def test_tasks_and_results_survive_pickling(segmented, shard):
    """The Ray adapter moves hand-offs pickled: they must come back equal."""
    _, result, _ = segmented
    task = fresh(shard, previous_files=("images/part-x.parquet",))
    assert pickle.loads(pickle.dumps(task)) == task
    relabel = ShardTask(shard, (PERSON,), PRINTS, drop=(CAT,), fresh=False, first=False)
    assert pickle.loads(pickle.dumps(relabel)) == relabel

    info = VideoInfo("/v/clip.mp4", 40, 24.0, 192, 144, True, "h264")
    video = Shard(
        "vabc-0000008",
        "video",
        (info.uri,),
        ("abc",),
        VideoSpan(1, 4, tuple(range(8, 20)), (8, 16), info),
    )
    assert pickle.loads(pickle.dumps(fresh(video))) == fresh(video)

    back = pickle.loads(pickle.dumps(result))
    assert back.task == result.task
    assert back.detections.num_rows > 0 and back.detections.equals(result.detections)
    assert back.images.equals(result.images)
    assert back.worker == result.worker and isinstance(back.worker, WorkerInfo)
    assert back.finished_at == result.finished_at and back.staging is None

    staged = ShardResult(
        fresh(video),
        result.detections,
        result.images,
        result.worker,
        1.0,
        staging=pa.table({"x": [1, 2]}),
    )
    again = pickle.loads(pickle.dumps(staged))
    assert again.task == staged.task and again.staging.equals(staged.staging)
