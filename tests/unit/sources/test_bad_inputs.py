"""Bad inputs and flaky storage at the stage level (no Ray): nothing raises, nothing is lost.

The whole-job versions (one job with every poison file, an actor crash, a killed
driver, a flaky S3) are in tests/integration/test_faults.py.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sam3ray.config import InferenceConfig, InputConfig, ModelConfig, ResourcesConfig
from sam3ray.core.ids import input_id
from sam3ray.core.shards import Shard
from sam3ray.core.types import Concept, ConceptSet
from sam3ray.output.markers import scan_markers
from sam3ray.output.schema import detections_table, images_table
from sam3ray.plan.shards import image_shard_id
from sam3ray.sources.listing import list_inputs
from sam3ray.stages.commit import CommitStage
from sam3ray.stages.decode import ImageReader
from sam3ray.stages.segment import SegmentStage
from sam3ray.stages.tasks import ShardResult, ShardTask, WorkerInfo
from sam3ray.storage.location import Location
from sam3ray.storage.retry import RetryPolicy, is_transient, retry_transient
from tests.support.bad_inputs import DEFAULT_MAX_PIXELS, bad_inputs, good_inputs
from tests.support.jobs import THING
from tests.support.s3proxy import FlakyS3Proxy

ROOT = Path(__file__).resolve().parents[3]


def image_shard(uris: list[str]) -> ShardTask:
    """A fresh task over ``uris`` (one concept: THING)."""
    ids = tuple(input_id(u) for u in uris)
    shard = Shard(image_shard_id(ids), "image", tuple(uris), ids)
    return ShardTask(shard, (THING,), ((THING, "fp"),))


def reader(max_pixels: int, threads: int = 3, window: int = 4) -> ImageReader:
    source = InputConfig(uris=["unused"], max_pixels=max_pixels)
    return ImageReader(source, threads=threads, window=window)


# -- decode: every poison file is one error entry, every odd-but-valid one decodes ----------


def test_reader_gives_one_entry_per_input_in_order_with_a_reason(tmp_path):
    files = bad_inputs() + good_inputs(2)
    uris = []
    for f in files:
        (tmp_path / f.name).write_bytes(f.data)
        uris.append(str(tmp_path / f.name))
    uris.append(str(tmp_path / "vanished.jpg"))  # listed, then deleted before the read
    out = list(reader(DEFAULT_MAX_PIXELS).read(uris, [f"id{i}" for i in range(len(uris))]))
    assert len(out) == len(uris)
    assert [d.uri for d in out] == uris and [d.image_id for d in out][:2] == ["id0", "id1"]
    for d, f in zip(out, files):
        if f.status == "error":
            assert (d.ok, d.error_reason) == (False, f.reason), f.name
            assert d.error.startswith(f"DecodeError: {f.reason}: "), d.error
            assert d.pixels is None and d.size is None
        else:
            assert (d.ok, d.error, d.error_reason) == (True, None, None), f.name
            assert d.size == f.size, f.name  # upright: EXIF applied
            assert d.pixels.shape == (*f.size, 3) and d.pixels.dtype == np.uint8  # original size
            assert d.pixels.flags["C_CONTIGUOUS"]
    last = out[-1]
    assert (last.ok, last.error_reason) == (False, "not_found")
    assert "vanished.jpg" in last.error


def test_reader_reads_ahead_in_parallel_but_only_window_images(tmp_path, monkeypatch):
    """Reads overlap (several in flight at once) and never run more than ``window``
    images ahead of the consumer: the bound on decoded pixels an actor holds."""
    import threading

    import sam3ray.stages.decode as decode_mod

    uris = []
    for i, f in enumerate(good_inputs(12)):
        path = tmp_path / f"{i:02d}.png"
        path.write_bytes(f.data)
        uris.append(str(path))
    lock = threading.Lock()
    state = {"active": 0, "most": 0, "started": 0}
    real = decode_mod.decode_one

    def slow(source, uri, image_id):
        with lock:
            state["active"] += 1
            state["started"] += 1
            state["most"] = max(state["most"], state["active"])
        time.sleep(0.05)  # a slow GET
        try:
            return real(source, uri, image_id)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(decode_mod, "decode_one", slow)
    it = reader(DEFAULT_MAX_PIXELS, threads=3, window=4).read(uris, uris)
    first = next(it)
    time.sleep(0.3)  # the consumer dawdles: the reader must stop at the window
    assert first.uri == uris[0] and first.ok
    assert state["started"] == 5  # the consumed one + 4 ahead, not all 12
    rest = list(it)
    assert [d.uri for d in rest] == uris[1:] and all(d.ok for d in rest)
    assert 2 <= state["most"] <= 3  # reads overlapped, never beyond the thread count
    it = reader(DEFAULT_MAX_PIXELS, threads=2, window=2).read(uris, uris)
    next(it)
    it.close()  # a consumer that stops early leaves nothing running
    assert state["active"] == 0


# -- inference: one poison image does not cost its batch-mates ------------------------------


class PoisonEngine:
    """A real engine that raises for any batch holding a 13x17 image (a wrapper, as in
    tests/support/faults.py: the production code has no switch for it)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch(self, images, exemplars=None, only=None):
        assert only is None, "a fresh task labels every concept"
        self.calls.append(len(images))
        if any(img.shape[:2] == (13, 17) for img in images):
            raise RuntimeError("shape mismatch in the mask decoder")
        return self.inner.launch(images, exemplars, only)


def test_a_poison_image_fails_alone_not_its_whole_batch(tmp_path, tiny_checkpoint):
    from PIL import Image

    sizes = [(40, 30), (13, 17), (44, 44), (36, 60)]  # the second one breaks inference
    uris = []
    for i, (h, w) in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(path)
        uris.append(str(path))
    concepts = ConceptSet((Concept(THING, "thing", ("x",)),))
    inference = InferenceConfig(images_per_batch=4, conf=0.0, max_det=3)
    stage = SegmentStage(
        ModelConfig(checkpoint=tiny_checkpoint, device="cpu"),
        inference,
        InputConfig(uris=[str(tmp_path)]),
        ResourcesConfig(),
        concepts,
        run_id="r1",
    )
    stage.setup()  # the model loads once; the test wraps what it loaded
    stage.engine = engine = PoisonEngine(stage.engine)
    result = stage.process(image_shard(uris))
    images = result.images.to_pylist()
    dets = result.detections
    assert [r["status"] for r in images] == ["ok", "error", "ok", "ok"]
    bad = images[1]
    assert bad["error_reason"] == "inference_failed" and "mask decoder" in bad["error"]
    assert [r["n_detections"] for r in images] == [3, 0, 3, 3]
    assert sorted(set(dets.column("uri").to_pylist())) == sorted([uris[0], uris[2], uris[3]])
    assert engine.calls == [4, 1, 1, 1, 1]  # the batch, then each image alone


# -- retries -----------------------------------------------------------------------------------


class _Throttled(Exception):
    def __init__(self) -> None:
        super().__init__("SlowDown")
        self.response = {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}


def test_retry_transient_retries_only_what_may_pass(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _Throttled()
        return "done"

    with caplog.at_level(logging.WARNING):
        assert retry_transient(flaky, "thing", RetryPolicy(5, base_delay=0.001)) == "done"
    assert len(calls) == 3 and caplog.text.count("thing failed") == 2

    finals = (
        FileNotFoundError("gone"),
        PermissionError("denied"),
        ValueError("bad"),
        OSError(errno.ENOSPC, "No space left on device"),
    )
    for final in finals:
        calls.clear()

        def broken(exc=final):
            calls.append(1)
            raise exc

        with pytest.raises(type(final)):
            retry_transient(broken, "x", RetryPolicy(5, base_delay=0.001))
        assert len(calls) == 1, final  # a final error is not retried

    calls.clear()

    def always():
        calls.append(1)
        raise _Throttled()

    with pytest.raises(_Throttled):
        retry_transient(always, "x", RetryPolicy(3, base_delay=0.001))
    assert len(calls) == 4 and is_transient(_Throttled())


def _tables(uri: str, shard_id: str):
    img = images_table(
        [
            {
                "run_id": "r1",
                "image_id": input_id(uri),
                "uri": uri,
                "shard_id": shard_id,
                "status": "ok",
                "n_detections": 1,
                "width": 8,
                "height": 8,
                "decode_ms": 1.0,
                "infer_ms": 1.0,
                "error_reason": None,
            }
        ]
    )
    det = detections_table(
        [
            {
                "run_id": "r1",
                "image_id": input_id(uri),
                "uri": uri,
                "class_id": THING,
                "concept": "thing",
                "score": 0.9,
                "box": [0, 0, 4, 4],
                "mask_rle": b"x",
                "mask_size": [8, 8],
                "area": 16,
                "width": 8,
                "height": 8,
                "model": "m",
            }
        ]
    )
    return det, img


def test_writes_and_listings_survive_a_throttled_store(moto_s3):
    """Client retries off (botocore max_attempts=1) and some requests throttled 5 times in
    a row (more than s3fs's own tries): sam3ray's retries still write and list everything."""
    bucket = "sam3ray-flaky-unit"  # a fixed name: the same requests fail in every session
    moto_s3.boto3_client().create_bucket(Bucket=bucket)
    for i in range(12):
        moto_s3.put(bucket, f"in/{i:02d}.png", b"x")
    forced = [("GET", "list-type=2"), ("PUT", "/_markers/")]
    with FlakyS3Proxy(
        moto_s3.endpoint_url, fail_rate=0.4, burst_share=0.3, forced_bursts=forced
    ) as proxy:
        opts = proxy.storage_options(config_kwargs={"retries": {"max_attempts": 1}})
        refs = list_inputs(InputConfig(uris=[f"s3://{bucket}/in/"], storage_options=opts))
        assert len(refs) == 12
        commit = CommitStage(Location(f"s3://{bucket}/out", opts), "r1")
        worker = WorkerInfo(os.getpid(), time.time(), 0.0, "m")
        for i in range(2):
            uri = f"s3://{bucket}/in/{i:02d}.png"
            task = image_shard([uri])
            det, img = _tables(uri, task.shard_id)
            summary = commit.process(ShardResult(task, det, img, worker, time.time()))
            assert (summary.n_inputs, summary.n_detections) == (1, 1)
    assert proxy.injected["PUT"] >= 5 and proxy.bursts_served >= 2
    markers = scan_markers(Location(f"s3://{bucket}/out", moto_s3.storage_options))
    assert len(markers) == 2
    fs = moto_s3.pyarrow_filesystem()
    for marker in markers.values():
        for rel in marker.files:
            assert pq.read_table(f"{bucket}/out/{rel}", filesystem=fs).num_rows == 1


# -- the actor-crash wrapper fires once per job -------------------------------------------


def _run_fault_hook(n: int, state_dir: str, shards: int) -> subprocess.CompletedProcess:
    """A process (an actor) whose segment stage is wrapped in ExitOnShard(n, state_dir)."""
    code = textwrap.dedent(
        f"""
        from tests.support.faults import ExitOnShard

        class Echo:
            name, resources = "segment", None

            def setup(self):
                pass

            def process(self, task):
                return task

        stage = ExitOnShard(Echo(), {n}, {state_dir!r})
        stage.setup()
        for k in range(1, {shards} + 1):
            assert stage.process(k) == k
            print("survived", k, flush=True)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3RAY_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_actor_exit_switch_fires_once_then_never_again(tmp_path):
    first = _run_fault_hook(2, str(tmp_path), 3)
    assert first.returncode == 17 and first.stdout.split() == ["survived", "1"], first.stderr
    fired = (tmp_path / "actor-exit.fired").read_text().split()
    assert fired[0] == "pid" and fired[3] == "2"
    restarted = _run_fault_hook(2, str(tmp_path), 3)  # the restarted actor sees the marker
    assert restarted.returncode == 0 and restarted.stdout.count("survived") == 3
    # Off by default: the production code has no fault switches at all.
    for path in (ROOT / "sam3ray").rglob("*.py"):
        assert "SAM3RAY_FAULT" not in path.read_text(encoding="utf-8"), path


def test_crash_actors_wraps_the_pipelines_segment_stage(monkeypatch, tmp_path):
    from sam3ray.runner import pipelines
    from tests.support.faults import ExitOnShard, crash_actors

    assert pipelines.SegmentStage is SegmentStage  # unwrapped unless a test asks
    crash_actors(monkeypatch, 3, str(tmp_path))
    concepts = ConceptSet((Concept(THING, "thing", ("x",)),))
    stage = pipelines.SegmentStage(
        ModelConfig(checkpoint="unused"),
        InferenceConfig(),
        InputConfig(uris=["unused"]),
        ResourcesConfig(),
        concepts,
        run_id="r",
    )
    assert isinstance(stage, ExitOnShard) and isinstance(stage.inner, SegmentStage)
    assert (stage.n, stage.state_dir, stage.name) == (3, str(tmp_path), "segment")
    assert stage.resources == stage.inner.resources and stage.resources.actor
    monkeypatch.undo()
    assert pipelines.SegmentStage is SegmentStage
