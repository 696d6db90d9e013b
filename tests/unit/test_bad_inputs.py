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

import numpy as np
import pyarrow.parquet as pq
import pytest

from sam3ray.inputs import image_id_for, is_transient, list_inputs, retry_transient
from sam3ray.model.engine import Detection
from sam3ray.output import images_table, scan_markers
from sam3ray.output_schema import detections_table
from sam3ray.stages import (
    SegmentShard,
    SegmentSpec,
    decode_shard,
    from_ipc,
    to_ipc,
    write_shard,
)
from sam3ray.types import Concept, ConceptSet
from tests.faults.bad_inputs import DEFAULT_MAX_PIXELS, bad_inputs, good_inputs
from tests.faults.s3proxy import FlakyS3Proxy

THING = "3f0b6a52-7c1e-4d2a-9b8f-1e2d3c4b5a60"


def shard_row(uris: list[str]) -> dict:
    return {
        "shard_id": "s" + image_id_for(uris[0]),
        "members_hash": "h",
        "uris": uris,
        "image_ids": [image_id_for(u) for u in uris],
        "previous_files": [],
    }


# -- decode: every poison file is one error entry, every odd-but-valid one decodes ----------


def test_decode_shard_gives_one_entry_per_input_with_a_reason(tmp_path):
    files = bad_inputs() + good_inputs(2)
    uris = []
    for f in files:
        (tmp_path / f.name).write_bytes(f.data)
        uris.append(str(tmp_path / f.name))
    uris.append(str(tmp_path / "vanished.jpg"))  # listed, then deleted before the read
    out = decode_shard(
        shard_row(uris), storage_options={}, max_pixels=DEFAULT_MAX_PIXELS, max_imgsz=256
    )
    assert len(out["status"]) == len(uris)
    for i, f in enumerate(files):
        if f.status == "error":
            assert (out["status"][i], out["error_reasons"][i]) == ("error", f.reason), f.name
            assert out["errors"][i].startswith(f"DecodeError: {f.reason}: "), out["errors"][i]
            assert out["pixels"][i] == b"" and out["orig_sizes"][i] == [0, 0]
        else:
            assert (out["status"][i], out["errors"][i]) == ("ok", None), f.name
            assert out["orig_sizes"][i] == list(f.size), f.name  # upright: EXIF applied
            h, w = out["shapes"][i]
            assert max(h, w) <= 256 and min(h, w) >= 1
            assert len(out["pixels"][i]) == h * w * 3
    assert (out["status"][-1], out["error_reasons"][-1]) == ("error", "not_found")
    assert "vanished.jpg" in out["errors"][-1]


# -- inference: one poison image does not cost its batch-mates ------------------------------


class _FakeEngine:
    """Raises for any batch that holds a 13x17 image; else one detection per image."""

    model_id = "fake@0"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, images, exemplars=None, orig_sizes=None):
        self.calls.append(len(images))
        if any(img.shape[:2] == (13, 17) for img in images):
            raise RuntimeError("shape mismatch in the mask decoder")
        out = []
        for img, (h, w) in zip(images, orig_sizes):
            mask = f"rle-{img.sum()}".encode()
            out.append(
                [Detection(THING, "thing", 'text:"x"', 0.9, (0, 0, w, h), mask, (h, w), h * w)]
            )
        return out


def test_a_poison_image_fails_alone_not_its_whole_batch(tmp_path):
    from PIL import Image

    sizes = [(20, 30), (13, 17), (24, 24), (16, 40)]  # the second one breaks inference
    uris = []
    for i, (h, w) in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(path)
        uris.append(str(path))
    row = decode_shard(shard_row(uris), storage_options={}, max_pixels=10**8, max_imgsz=64)
    spec = SegmentSpec(
        checkpoint="unused",
        concepts=ConceptSet((Concept(THING, "thing", ("x",)),)),
        images_per_batch=4,
    )
    stage = SegmentShard(spec)
    stage.engine = engine = _FakeEngine()
    result = stage(row)
    images = from_ipc(result["images_ipc"]).to_pylist()
    dets = from_ipc(result["detections_ipc"])
    assert [r["status"] for r in images] == ["ok", "error", "ok", "ok"]
    bad = images[1]
    assert bad["error_reason"] == "inference_failed" and "mask decoder" in bad["error"]
    assert [r["n_detections"] for r in images] == [1, 0, 1, 1]
    assert sorted(dets.column("uri").to_pylist()) == sorted([uris[0], uris[2], uris[3]])
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
        assert retry_transient(flaky, "thing", 5, base_delay=0.001) == "done"
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
            retry_transient(broken, "x", 5, base_delay=0.001)
        assert len(calls) == 1, final  # a final error is not retried

    calls.clear()

    def always():
        calls.append(1)
        raise _Throttled()

    with pytest.raises(_Throttled):
        retry_transient(always, "x", 3, base_delay=0.001)
    assert len(calls) == 4 and is_transient(_Throttled())


def _tables(uri: str):
    img = images_table(
        [
            {
                "run_id": "r1",
                "image_id": image_id_for(uri),
                "uri": uri,
                "shard_id": "s" + image_id_for(uri),
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
                "image_id": image_id_for(uri),
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
        from sam3ray.config import InputConfig

        refs = list_inputs(InputConfig(uris=[f"s3://{bucket}/in/"], storage_options=opts))
        assert len(refs) == 12
        for i in range(2):
            uri = f"s3://{bucket}/in/{i:02d}.png"
            det, img = _tables(uri)
            row = {
                "shard_id": "s" + image_id_for(uri),
                "members_hash": "h",
                "previous_files": [],
                "detections_ipc": to_ipc(det),
                "images_ipc": to_ipc(img),
            }
            summary = write_shard(
                row, output_uri=f"s3://{bucket}/out", storage_options=opts, run_id="r1"
            )
            assert (summary["n_inputs"], summary["n_detections"]) == (1, 1)
    assert proxy.injected["PUT"] >= 5 and proxy.bursts_served >= 2
    markers = scan_markers(f"s3://{bucket}/out", moto_s3.storage_options)
    assert len(markers) == 2
    fs = moto_s3.pyarrow_filesystem()
    for marker in markers.values():
        for rel in marker.files:
            assert pq.read_table(f"{bucket}/out/{rel}", filesystem=fs).num_rows == 1


# -- the actor-crash switch fires once per job -------------------------------------------------


def _run_fault_hook(env: dict[str, str], batches: int) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        from sam3ray.stages import _fault_actor_exit
        for n in range(1, {batches} + 1):
            _fault_actor_exit(n)
            print("survived", n, flush=True)
        """
    )
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3RAY_FAULT")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120
    )


def test_actor_exit_switch_fires_once_then_never_again(tmp_path):
    env = {"SAM3RAY_FAULT_ACTOR_EXIT_ON_BATCH": "2", "SAM3RAY_FAULT_STATE_DIR": str(tmp_path)}
    first = _run_fault_hook(env, 3)
    assert first.returncode == 17 and first.stdout.split() == ["survived", "1"], first.stderr
    fired = (tmp_path / "actor-exit.fired").read_text().split()
    assert fired[0] == "pid" and fired[3] == "2"
    restarted = _run_fault_hook(env, 3)  # the restarted actor sees the marker
    assert restarted.returncode == 0 and restarted.stdout.count("survived") == 3
    # Off by default, and inert without a state dir (it could not fire only once).
    assert _run_fault_hook({}, 3).returncode == 0
    no_state = _run_fault_hook({"SAM3RAY_FAULT_ACTOR_EXIT_ON_BATCH": "1"}, 2)
    assert no_state.returncode == 0 and "no fault injected" in no_state.stderr
