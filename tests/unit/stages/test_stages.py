"""The image stages without Ray: segment (reads, decodes, labels) -> commit, called directly.

The runner's Ray adapter only moves these stages' typed hand-offs between
processes (pickled), so what is checked here is what a job does per shard:
rows equal to the engine run directly on the original pixels, the overlap of
one batch's host work with the next batch's forward, and out-of-memory errors
that split a batch instead of costing the shard.
"""

from __future__ import annotations

import pickle
import weakref
from collections import Counter
from dataclasses import replace
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
from sam3ray.stages.decode import decode_one
from sam3ray.stages.segment import SegmentStage
from sam3ray.stages.tasks import CommitSummary, ShardResult, ShardTask, WorkerInfo
from sam3ray.storage.location import Location
from tests.support.images import encode, scene
from tests.support.jobs import CAT, PERSON

CONCEPTS = ConceptSet(
    (Concept(CAT, "cat", ("cat", "kitten")), Concept(PERSON, "person", ("person",)))
)
#: Two images per batch (so a shard has several), masks in original pixels.
INFERENCE = InferenceConfig(conf=0.3, iou=0.7, nms=True, max_det=20, images_per_batch=2)
SIZES = [(96, 128), (120, 90), (64, 64)]  # (h, w); the corrupt file sits second
RUN = "run-1"
#: The shard's per-concept fingerprints once its task commits.
PRINTS = tuple(sorted({CAT: "fp-cat", PERSON: "fp-person"}.items()))
#: Columns that carry what the model found and where (created_at is a wall-clock stamp).
DET_COLUMNS = (
    "image_id", "uri", "class_id", "concept", "query", "score", "box", "mask_rle",
    "mask_size", "area", "width", "height", "model", "frame_index", "track_id",
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


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
def segmented(tiny_checkpoint, inputs, shard):
    metrics = Recorder()
    stage = SegmentStage(
        ModelConfig(checkpoint=tiny_checkpoint, device="cpu"),
        INFERENCE,
        InputConfig(uris=[str(Path(inputs[0][0]).parent)]),
        ResourcesConfig(gpus_per_actor=0),
        CONCEPTS,
        run_id=RUN,
        metrics=metrics,
    )
    stage.setup()
    return stage, stage.process(fresh(shard, previous_files=("stale.parquet",))), metrics


# --------------------------------------------------------------------------- segment


def test_segment_gives_one_images_row_per_input_and_detections_only_for_ok_ones(
    inputs, shard, segmented
):
    _, result, metrics = segmented
    uris, arrays = inputs
    assert isinstance(result, ShardResult) and result.task.shard == shard
    assert result.task.previous_files == ("stale.parquet",)
    assert result.staging is None
    img = result.images.to_pylist()
    assert [r["uri"] for r in img] == list(uris)
    assert [r["status"] for r in img] == ["ok", "error", "ok", "ok"]
    assert img[1]["error_reason"] == "truncated" and img[1]["n_detections"] == 0
    assert img[1]["error"].startswith("DecodeError: truncated")
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
    """Read + decode + segment give exactly what Sam3Engine.predict gives on the source
    pixels, in the same batches (the corrupt file does not count as a batch member)."""
    stage, result, _ = segmented
    uris, arrays = inputs
    engine = Sam3Engine.from_checkpoint(tiny_checkpoint, CONCEPTS, INFERENCE, device="cpu")
    assert engine.model_id == stage.engine.model_id
    ok = [i for i, a in enumerate(arrays) if a is not None]
    step = INFERENCE.images_per_batch
    found = [
        dets
        for s in range(0, len(ok), step)
        for dets in engine.predict([arrays[i] for i in ok[s : s + step]])
    ]
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


def test_columns_give_the_table_the_row_builder_gives(segmented):
    """The image path builds detection tables from the engine's columns; the video path
    from Detection rows. Same batch, both builders: the same table."""
    from sam3ray.output.schema import detections_table, utc_now
    from sam3ray.stages.rows import InputInfo, batch_detections_table, detection_rows
    from tests.support.images import scene

    stage = segmented[0]
    images = [scene(3, (90, 70)), scene(4, (50, 120))]
    found = stage.engine.launch(images).result()
    assert len(found) > 0 and found.counts().tolist() == [len(x) for x in found.per_image()]
    infos = [InputInfo(RUN, f"id{i}", f"/x/{i}.png", w, h, "m@1") for i, (h, w, _) in
             enumerate(img.shape for img in images)]  # fmt: skip
    now = utc_now()
    columns = batch_detections_table(infos, found, now=now)
    rows = [r for info, dets in zip(infos, found.per_image()) for r in
            detection_rows(info, dets, now=now)]  # fmt: skip
    assert columns.equals(detections_table(rows))


class Timeline:
    """Wraps the stage's engine; records when each batch's device and host phases ran."""

    def __init__(self, inner) -> None:
        import threading

        self.inner = inner
        self.model_id = inner.model_id
        self.events: list[tuple[str, int, float, str]] = []
        self._threading = threading

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch(self, images, exemplars=None, only=None):
        import time

        k = sum(1 for e in self.events if e[0] == "launch-start")
        self.events.append(("launch-start", k, time.perf_counter(), ""))
        pending = self.inner.launch(images, exemplars, only)
        self.events.append(("launch-end", k, time.perf_counter(), ""))
        timeline, real = self, pending.result

        def result():
            timeline.events.append(
                ("host-start", k, time.perf_counter(), timeline._threading.current_thread().name)
            )
            return real()

        pending.result = result
        return pending


def test_host_phase_of_a_batch_overlaps_the_next_batchs_forward(segmented, shard):
    """While batch k+1's forward runs, a worker thread finishes batch k (COCO strings,
    table): the device never waits for the host's bookkeeping."""
    stage, want, _ = segmented
    engine = stage.engine
    stage.engine = timeline = Timeline(engine)
    try:
        got = stage.process(fresh(shard))
    finally:
        stage.engine = engine
    assert got.detections.drop(["created_at"]).equals(want.detections.drop(["created_at"]))
    at = {(e[0], e[1]): e[2] for e in timeline.events}
    threads = {e[3] for e in timeline.events if e[0] == "host-start"}
    assert at[("launch-start", 1)] and len(threads) == 1 and "sam3ray-host" in threads.pop()
    # Batch 0's host phase began before batch 1's forward ended: they overlapped.
    assert at[("host-start", 0)] < at[("launch-end", 1)]


class OutOfMemory:
    """Wraps an engine: batches of more than ``limit`` images fail as a GPU would
    (torch.OutOfMemoryError), holding activations in the failing frame as a forward
    does; a test-only wrapper, no production switch."""

    def __init__(self, inner, limit: int) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.limit = limit
        self.calls: list[int] = []
        self.released = 0
        self.activations: list[weakref.ref] = []
        self.pinned_at_release: list[bool] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch(self, images, exemplars=None, only=None):
        self.calls.append(len(images))
        if len(images) > self.limit:
            self._forward_out_of_memory()
        return self.inner.launch(images, exemplars, only)

    def _forward_out_of_memory(self) -> None:
        activations = torch.empty(1 << 16)  # alive as long as this frame is
        self.activations.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def release_memory(self) -> None:
        self.released += 1
        self.pinned_at_release.append(any(r() is not None for r in self.activations))


def oom_stage(tiny_checkpoint, inputs, images_per_batch: int) -> SegmentStage:
    stage = SegmentStage(
        ModelConfig(checkpoint=tiny_checkpoint, device="cpu"),
        INFERENCE.model_copy(update={"images_per_batch": images_per_batch}),
        InputConfig(uris=[str(Path(inputs[0][0]).parent)]),
        ResourcesConfig(gpus_per_actor=0),
        CONCEPTS,
        run_id=RUN,
    )
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def one_by_one(tiny_checkpoint, inputs, shard) -> ShardResult:
    """The shard labelled one image per batch (what a fully split batch computes)."""
    return oom_stage(tiny_checkpoint, inputs, images_per_batch=1).process(fresh(shard))


def test_out_of_memory_splits_the_batch_and_later_batches_stay_smaller(
    tiny_checkpoint, inputs, shard, one_by_one
):
    want = one_by_one
    stage = oom_stage(tiny_checkpoint, inputs, images_per_batch=3)
    stage.engine = oom = OutOfMemory(stage.engine, limit=1)
    first = stage.process(fresh(shard))
    # 3 ok images: [3] fails -> [2] fails -> [1] [1]; the 3rd image comes alone.
    assert oom.calls == [3, 2, 1, 1, 1] and oom.released == 2
    # Memory is released after the failed forward's frames are gone (a traceback
    # still being handled would pin them, and the halves would run out again).
    assert oom.pinned_at_release == [False, False]
    assert stage.images_per_batch() == 1
    second = stage.process(fresh(shard))
    assert oom.calls[5:] == [1, 1, 1]  # the next shard starts at the smaller size
    for got in (first, second):  # nothing lost, nothing different
        assert got.images.select(["status", "n_detections"]).equals(
            want.images.select(["status", "n_detections"])
        )
        assert got.detections.drop(["created_at"]).equals(want.detections.drop(["created_at"]))


def test_an_image_that_runs_out_of_memory_alone_is_an_error_row_not_a_lost_shard(
    tiny_checkpoint, inputs, shard, one_by_one
):
    want = one_by_one
    stage = oom_stage(tiny_checkpoint, inputs, images_per_batch=2)
    stage.engine = oom = OutOfMemory(stage.engine, limit=0)  # nothing fits
    got = stage.process(fresh(shard))
    rows = got.images.to_pylist()
    assert [r["status"] for r in rows] == ["error"] * 4
    assert [r["error_reason"] for r in rows] == ["inference_failed", "truncated"] + [
        "inference_failed"
    ] * 2
    assert "out of memory" in rows[0]["error"] and got.detections.num_rows == 0
    assert stage.images_per_batch() == 1
    oom.limit = 2  # memory is back: the same actor labels the next shard in full
    again = stage.process(fresh(shard))
    assert again.detections.drop(["created_at"]).equals(want.detections.drop(["created_at"]))


class HostPhaseFails:
    """Wraps an engine: the first batch of several images fails in its host phase
    (post-processing), after its forward; a test-only wrapper."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.broken: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch(self, images, exemplars=None, only=None):
        pending = self.inner.launch(images, exemplars, only)
        if len(images) > 1 and not self.broken:
            self.broken.append(len(images))
            return _BrokenPending()
        return pending


class _BrokenPending:
    def result(self):
        raise RuntimeError("rle encoder broke")


def test_a_batch_whose_post_processing_fails_is_redone_from_its_pixels_not_reread(
    tiny_checkpoint, inputs, shard, one_by_one
):
    stage = oom_stage(tiny_checkpoint, inputs, images_per_batch=3)
    stage.engine = engine = HostPhaseFails(stage.engine)
    # As the sam3ray.label operator hands in bytes or arrays: URIs nothing can read again.
    images = [
        replace(decode_one(stage.source, uri, iid), uri=f"sha1:{k}")
        for k, (uri, iid) in enumerate(zip(shard.uris, shard.image_ids, strict=True))
    ]
    got = stage.label(fresh(shard), images)
    assert engine.broken == [3]
    cols = ["status", "error_reason", "n_detections"]
    assert got.images.select(cols).equals(one_by_one.images.select(cols))
    drop = ["created_at", "uri"]
    assert got.detections.drop(drop).equals(one_by_one.detections.drop(drop))


def _relabelled(segmented, shard, monkeypatch) -> tuple[str, pa.Table, ShardResult]:
    """The concept the full run found most of, its rows there, and a relabel of it alone."""
    stage, result, _ = segmented
    monkeypatch.setattr(stage, "metrics", Recorder())
    cid = Counter(result.detections.column("class_id").to_pylist()).most_common(1)[0][0]
    task = ShardTask(shard, (cid,), PRINTS, fresh=False, first=False)
    want = result.detections.filter(pc.equal(result.detections.column("class_id"), cid))
    return cid, want, stage.process(task)


def _same_labels(got: pa.Table, want: pa.Table) -> None:
    """The same detections per (image, query), best first: scores within 1e-4 and mask
    IoU >= 0.99 (a relabel packs other queries into a forward: float noise only)."""
    from sam3ray.core.masks import rle_iou

    def grouped(t: pa.Table) -> dict[tuple[str, str], list[dict]]:
        out: dict[tuple[str, str], list[dict]] = {}
        for r in t.select(["image_id", "query", "score", "mask_rle", "mask_size"]).to_pylist():
            out.setdefault((r["image_id"], r["query"]), []).append(r)
        return {k: sorted(v, key=lambda r: -r["score"]) for k, v in out.items()}

    g, w = grouped(got), grouped(want)
    assert g.keys() == w.keys()
    for key, rows in w.items():
        assert len(g[key]) == len(rows), key
        for a, b in zip(g[key], rows, strict=True):
            assert abs(a["score"] - b["score"]) < 1e-4
            assert rle_iou(a["mask_rle"], b["mask_rle"], b["mask_size"]) >= 0.99


def test_a_relabel_runs_only_its_concepts_and_gives_what_a_full_run_gives(
    segmented, shard, monkeypatch
):
    """A task that relabels one concept of a committed shard asks the engine for that
    concept only and finds what the full run found of it (NMS and max_det act per
    concept), with its rows counted per input."""
    cid, want, again = _relabelled(segmented, shard, monkeypatch)
    assert set(again.detections.column("class_id").to_pylist()) == {cid}
    assert want.num_rows > 0
    _same_labels(again.detections, want)
    per_input = Counter(again.detections.column("image_id").to_pylist())
    assert max(per_input.values()) <= INFERENCE.max_det
    rows = again.images.to_pylist()
    assert [r["n_detections"] for r in rows] == [per_input[r["image_id"]] for r in rows]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok"]


def test_max_det_caps_each_concept_on_an_image(tiny_checkpoint, inputs, shard):
    """max_det is per (image, concept): with max_det 1 no image has two rows of one
    concept, and a concept's row equals its best row of the uncapped run."""

    def run(max_det: int) -> pa.Table:
        stage = SegmentStage(
            ModelConfig(checkpoint=tiny_checkpoint, device="cpu"),
            INFERENCE.model_copy(update={"max_det": max_det, "conf": 0.0}),
            InputConfig(uris=[str(Path(inputs[0][0]).parent)]),
            ResourcesConfig(gpus_per_actor=0),
            CONCEPTS,
            run_id=RUN,
        )
        return stage.process(fresh(shard)).detections

    capped, full = run(1), run(300)

    def best(table: pa.Table) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for r in table.select(["image_id", "class_id", "score"]).to_pylist():
            key = (r["image_id"], r["class_id"])
            out[key] = max(out.get(key, -1.0), r["score"])
        return out

    pairs = Counter(zip(*(capped.column(c).to_pylist() for c in ("image_id", "class_id"))))
    assert set(pairs.values()) == {1}
    assert dict(best(capped)) == best(full)  # every (image, concept) keeps its best row
    assert len(pairs) > len({i for i, _ in pairs})  # several concepts kept on one image


def test_a_drop_only_task_reads_and_labels_nothing(shard, segmented):
    stage, _, _ = segmented
    task = ShardTask(shard, (), ((PERSON, "fp-person"),), drop=(CAT,), fresh=False, first=False)
    result = stage.process(task)
    assert result.task == task
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

    # Rows stay small: a task is URIs, never pixels (a 512-input shard, the 2× cap at the
    # default shard_size, with long URIs, against Ray Data's 128 MiB block target).
    uris = tuple(f"s3://a-bucket/some/long/prefix/2026/12/01/cam-{i:05d}.jpg" for i in range(512))
    big = Shard("s0", "image", uris, tuple(input_id(u) for u in uris))
    assert len(pickle.dumps(fresh(big, previous_files=uris), protocol=5)) < 256 * 1024

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
