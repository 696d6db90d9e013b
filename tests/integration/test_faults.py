"""Nothing lost: poison inputs, a dying actor, a killed driver, a flaky object store.

Every test runs the real job (local Ray, moto S3 on 127.0.0.1, the tiny model) and
checks the promise of the images table: every input exactly once, as ok or as
one error row with a reason, and detections equal to an undisturbed run's.
The undisturbed run (``clean_run``) is shared by the three disturbed ones: they
read the same S3 objects, so image ids, shards and batches are identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from sam3ray.cli import main as cli_main
from sam3ray.config import JobConfig
from sam3ray.core.ids import input_id
from sam3ray.output.state import COMMITS_DIR
from sam3ray.runner.job import run_job
from tests.support.bad_inputs import bad_inputs, good_inputs
from tests.support.faults import crash_actors
from tests.support.jobs import (
    THING_CSV,
    assert_committed_files_whole,
    detection_keys,
    fault_job_config,
    fault_job_dict,
    image_rows,
    images_for,
    kill_ray_instance,
    outcome,
    read_tables,
    write_concepts,
)
from tests.support.s3proxy import FlakyS3Proxy

N_IMAGES = 10


@pytest.fixture(scope="module")
def concepts(tmp_path_factory) -> str:
    return write_concepts(tmp_path_factory.mktemp("fault-prompts"), THING_CSV)


@pytest.fixture(scope="module")
def fault_inputs(moto_s3) -> tuple[str, list[str]]:
    """A bucket of N_IMAGES scenes: (bucket, sorted URIs).

    Fixed bucket names (moto is private to the session): the flaky-store test then
    meets the same failures on every run, since the proxy's choice hashes the request.
    """
    bucket = "sam3ray-faults-in"
    moto_s3.boto3_client().create_bucket(Bucket=bucket)
    uris = [moto_s3.put(bucket, f"in/{name}", data) for name, data in images_for(N_IMAGES)]
    return bucket, sorted(uris)


@pytest.fixture(scope="module")
def clean_run(ray_session, moto_s3, fault_inputs, concepts, tiny_checkpoint, tmp_path_factory):
    """The undisturbed run every disturbed one must equal: (images, detections)."""
    bucket, uris = fault_inputs
    out = tmp_path_factory.mktemp("clean") / "out"
    cfg = fault_job_config(
        uris=[f"s3://{bucket}/in/"],
        storage_options=moto_s3.storage_options,
        concepts=concepts,
        checkpoint=tiny_checkpoint,
        output=str(out),
    )
    summary = run_job(cfg)
    images, detections = read_tables(str(out))
    assert summary["ok"] == N_IMAGES and summary["errors"] == 0
    assert sorted(image_rows(images)) == uris
    assert detections.num_rows > 0, "a comparison with no detections proves nothing"
    return images, detections


def assert_same_as_clean(root: str, clean, filesystem=None) -> None:
    images, detections = read_tables(root, filesystem)
    clean_images, clean_detections = clean
    assert outcome(images) == outcome(clean_images)  # every input once, same conclusion
    got, want = detection_keys(detections), detection_keys(clean_detections)
    assert max(got.values()) == 1, "a detection written twice"
    assert got == want


# -- 2. an actor dies mid-job --------------------------------------------------------------


def test_actor_crash_is_retried_on_a_restarted_actor(
    ray_session, moto_s3, fault_inputs, concepts, tiny_checkpoint, tmp_path, monkeypatch, clean_run
):
    bucket, _ = fault_inputs
    state = tmp_path / "fault-state"
    state.mkdir()
    crash_actors(monkeypatch, 3, str(state))
    cfg = fault_job_config(
        uris=[f"s3://{bucket}/in/"],
        storage_options=moto_s3.storage_options,
        concepts=concepts,
        checkpoint=tiny_checkpoint,
        output=str(tmp_path / "out"),
    )
    summary = run_job(cfg)

    fired = (state / "actor-exit.fired").read_text().split()
    assert fired[0] == "pid" and fired[3] == "3", fired  # it fired, once, on shard 3
    crashed_pid = int(fired[1])
    # One actor in the pool: the shards before the crash came from the first process,
    # the rest (the lost one included) from its restart, which loaded the model once.
    assert summary["actors"]["count"] == 2, summary["actors"]
    assert summary["actors"]["model_loads_per_actor"] == [1, 1]
    assert summary["ok"] == N_IMAGES and summary["errors"] == 0
    assert summary["shards"]["done_now"] == N_IMAGES  # shard_size 1: one row per shard
    assert_same_as_clean(str(tmp_path / "out"), clean_run)
    assert not Path(f"/proc/{crashed_pid}").exists(), "the crashed actor process is gone"


# -- 3. the driver is SIGKILLed mid-run, then the job is resumed ---------------------------


def _visible_parquet_files_parse(root: Path) -> None:
    import pyarrow.parquet as pq

    for sub in ("images", "detections"):
        for path in (root / sub).rglob("*.parquet") if (root / sub).is_dir() else []:
            if not any(p.startswith(".") for p in path.relative_to(root).parts):
                pq.read_metadata(path)  # raises on a partial file


def _commit_keys(root: Path) -> list[Path]:
    """The commit keys of every run: a shard is committed once its key exists (written
    after its files and marker), so a kill between marker and key leaves it uncommitted."""
    commits = root / COMMITS_DIR
    return sorted(commits.glob("*/*/*.json")) if commits.is_dir() else []


def test_driver_sigkill_then_resume_equals_clean_run(
    ray_session, moto_s3, fault_inputs, concepts, tiny_checkpoint, tmp_path, clean_run
):
    bucket, uris = fault_inputs
    out = tmp_path / "out"
    data = fault_job_dict(
        uris=[f"s3://{bucket}/in/"],
        storage_options=moto_s3.storage_options,
        concepts=concepts,
        checkpoint=tiny_checkpoint,
        output=str(out),
    )
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    # The killed driver's own Ray lives under a unique, short RAY_TMPDIR (unix socket
    # paths are limited to 107 bytes), so its orphans can be found and killed alone.
    ray_tmp = tempfile.mkdtemp(prefix="s3r-kill-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmp
    log = tmp_path / "driver.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sam3ray.cli", "run", str(config)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg hits nothing else
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            _visible_parquet_files_parse(out)  # never a partial file, at any moment
            if _commit_keys(out):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert proc.poll() is None, f"driver ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no shard committed:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        kill_ray_instance(proc.pid, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert_committed_files_whole(out)  # every marker's files whole, even an uncommitted one
    committed = len(_commit_keys(out))  # other shards may have died between marker and key
    assert 1 <= committed < N_IMAGES, committed
    assert not (out / "runs").exists(), "a SIGKILLed driver writes no summary"
    (dead,) = (p.name for p in (out / "_state" / "plans").iterdir())
    assert not (out / "_state" / "runs").exists(), "the dead run never consolidated"

    summary = run_job(JobConfig.model_validate(data))  # resume (the default), in the test's Ray
    # The dead run's commits were folded into the state (kept, not redone) and what it
    # left half-written was removed; only its uncommitted inputs are labelled now.
    recovered = summary["plan"]["recovered_runs"][dead]
    assert recovered["committed"] == committed and recovered["tasks"] == N_IMAGES
    assert summary["inputs_skipped_done"] == committed
    assert summary["inputs_processed"] == N_IMAGES - committed
    assert_committed_files_whole(out)
    assert_same_as_clean(str(out), clean_run)
    again = run_job(JobConfig.model_validate(data))
    assert again["inputs_processed"] == 0 and again["plan"]["recovered_runs"] == {}


# -- 4. a flaky object store ---------------------------------------------------------------


def test_flaky_object_storage_loses_nothing(
    ray_session, moto_s3, fault_inputs, concepts, tiny_checkpoint, clean_run
):
    """20% of requests (reads, listings, writes) get 503 SlowDown, some for 5 tries in a
    row. Botocore's retries are off, so s3fs's and sam3ray's own retries must carry it."""
    bucket, _ = fault_inputs
    out_bucket = "sam3ray-faults-out"
    moto_s3.boto3_client().create_bucket(Bucket=out_bucket)
    forced = [("GET", "/in/img-003.png"), ("PUT", "/images/part-"), ("GET", "list-type=2")]
    with FlakyS3Proxy(
        moto_s3.endpoint_url, fail_rate=0.2, burst_share=0.3, forced_bursts=forced
    ) as proxy:
        opts = proxy.storage_options(config_kwargs={"retries": {"max_attempts": 1}})
        cfg = fault_job_config(
            uris=[f"s3://{bucket}/in/"],
            storage_options=opts,
            concepts=concepts,
            checkpoint=tiny_checkpoint,
            output=f"s3://{out_bucket}/labels",
        )
        summary = run_job(cfg)
    # A read, a write and a listing each failed 5 times in a row (beyond s3fs's tries):
    # only sam3ray's own retries got them through.
    assert proxy.bursts_served >= 3, (proxy.bursts_served, dict(proxy.injected_kinds))
    assert proxy.injected_kinds["PUT object"] >= 5 and proxy.injected_kinds["GET object"] >= 5
    clean_images, clean_detections = clean_run
    assert summary["ok"] == N_IMAGES and summary["errors"] == 0
    assert summary["detections"] == clean_detections.num_rows
    assert_same_as_clean(f"{out_bucket}/labels", clean_run, moto_s3.pyarrow_filesystem())
    runs = moto_s3.boto3_client().list_objects_v2(Bucket=out_bucket, Prefix="labels/runs/")
    assert [o["Key"] for o in runs["Contents"]] == [f"labels/runs/{summary['run_id']}.json"]


# -- 1 + 5. poison inputs in one job; credentials never leak ------------------------------


def _deny_get(moto_s3, bucket: str, key: str) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/{key}",
            }
        ],
    }
    moto_s3.boto3_client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def test_poison_inputs_become_one_error_row_each(
    ray_session, moto_s3, concepts, tiny_checkpoint, tmp_path, caplog, capfd
):
    import logging

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    caplog.set_level(logging.DEBUG)
    bucket = moto_s3.new_bucket("poison")
    files = bad_inputs() + good_inputs(3)
    for f in files:
        moto_s3.put(bucket, f"in/{f.name}", f.data)
    moto_s3.put(bucket, "in/forbidden.png", good_inputs(1)[0].data)  # a fine image, no access
    _deny_get(moto_s3, bucket, "in/forbidden.png")
    names = [f.name for f in files] + ["forbidden.png", "deleted.png"]  # deleted: 404
    manifest = moto_s3.put(bucket, "list.txt", "".join(f"s3://{bucket}/in/{n}\n" for n in names))
    uri = {n: f"s3://{bucket}/in/{n}" for n in names}

    key_id, secret = f"AKIACANARY{uuid.uuid4().hex[:10].upper()}", f"canary-{uuid.uuid4().hex}"
    opts = {
        "key": key_id,
        "secret": secret,
        "client_kwargs": {"endpoint_url": moto_s3.endpoint_url, "region_name": "us-east-1"},
    }
    out = tmp_path / "out"
    data = fault_job_dict(
        manifest=manifest,
        storage_options=opts,
        concepts=concepts,
        checkpoint=tiny_checkpoint,
        output=str(out),
        shard_size=4,
        actors=(1, 1),
        max_error_rate=0.5,
    )
    data["inference"]["conf"] = 0.0  # every ok image gets detections (max_det of them)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")

    assert cli_main(["run", str(config)]) == 0
    printed = capfd.readouterr()
    (summary_path,) = (out / "runs").glob("*.json")
    summary = json.loads(summary_path.read_text())
    expected_errors = {
        "empty": 1,
        "truncated": 1,
        "not_an_image": 2,
        "too_large": 1,
        "forbidden": 1,
        "not_found": 1,
    }
    n_ok = sum(f.status == "ok" for f in files)
    assert summary["status"] == "succeeded"
    assert summary["inputs_total"] == len(names) == n_ok + sum(expected_errors.values())
    assert (summary["ok"], summary["errors"]) == (n_ok, 7)
    assert summary["errors_by_reason"] == expected_errors
    assert "errors 7" in printed.out and "error forbidden: 1" in printed.out

    images, detections = read_tables(str(out))
    rows = image_rows(images)  # exactly once each
    assert sorted(rows) == sorted(uri.values())
    per_image = detections.group_by("image_id").aggregate([("score", "count")]).to_pylist()
    det_count = {r["image_id"]: r["score_count"] for r in per_image}
    for f in files:
        row = rows[uri[f.name]]
        assert row["image_id"] == input_id(uri[f.name])
        if f.status == "error":
            assert (row["status"], row["error_reason"]) == ("error", f.reason), f.name
            assert row["error"].startswith(f"DecodeError: {f.reason}: "), row["error"]
            assert row["n_detections"] == 0 and row["width"] is None
            assert det_count.get(row["image_id"], 0) == 0
        else:
            assert (row["status"], row["error"]) == ("ok", None), (f.name, row["error"])
            assert (row["height"], row["width"]) == f.size, f.name  # upright (EXIF applied)
            assert row["n_detections"] == det_count[row["image_id"]] > 0, f.name
    for name, reason, text in (
        ("forbidden.png", "forbidden", "PermissionError: "),
        ("deleted.png", "not_found", "FileNotFoundError: "),
    ):
        row = rows[uri[name]]
        assert (row["status"], row["error_reason"]) == ("error", reason)
        assert row["error"].startswith(text) and row["n_detections"] == 0
    # Masks and boxes of the EXIF-rotated photo are in the upright frame (48 wide, 96 tall).
    exif_id = input_id(uri["exif-rotated.jpg"])
    for d in detections.filter(pc.equal(detections["image_id"], exif_id)).to_pylist():
        assert d["mask_size"] == [96, 48] and (d["width"], d["height"]) == (48, 96)
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= 48 and 0 <= y0 <= y1 <= 96
    panorama_id = input_id(uri["panorama.png"])
    panorama = detections.filter(pc.equal(detections["image_id"], panorama_id))
    assert {tuple(m) for m in panorama.column("mask_size").to_pylist()} == {(20, 20000)}

    # 5. The credentials appear nowhere: logs (this process and Ray's), stdout/stderr,
    # the run summary, markers, and every byte of every Parquet file.
    import ray

    places = {"caplog": caplog.text, "stdout": printed.out, "stderr": printed.err}
    for path in out.rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("latin-1")
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in logs_dir.rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("latin-1")
    assert any(p.endswith(".parquet") for p in places) and str(summary_path) in places
    for where, text in places.items():
        assert secret not in text and key_id not in text, f"credential leaked into {where}"
    assert summary["config"]["input"]["storage_options"]["secret"] == "***"
    assert pq.read_table(next(out.glob("images/*.parquet"))).num_rows > 0

    # Above output.max_error_rate the job fails (exit 3) and still writes its summary.
    assert cli_main(["run", str(config), "--set", "output.max_error_rate=0.3",
                     "--set", "output.mode=overwrite"]) == 3  # fmt: skip
    failed_out = capfd.readouterr()
    assert "exceeds output.max_error_rate 0.3" in failed_out.err
    failed = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    failed = [s for s in failed if s["run_id"] != summary["run_id"]]
    assert len(failed) == 1 and failed[0]["status"] == "failed"
    assert failed[0]["errors"] == 7 and failed[0]["inputs_processed"] == len(names)
    assert f"error rate {7 / len(names):.3f} exceeds" in failed[0]["failure"]
