"""A growing lake on S3 (moto on 127.0.0.1): inventories, incremental runs, crash and resume.

What a nightly job over a lake of billions needs, on a few images: the input is an
S3 Inventory report in the real format; a run over a grown lake labels exactly the
new objects; a crash mid-run (with a throttling object store) resumes to the same
output as an undisturbed run; and planning on the cluster (Ray Data) gives the same
plan as planning in-process.
"""

from __future__ import annotations

import gzip
import io
import json
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sam3ray.config import JobConfig
from sam3ray.runner import pipelines
from sam3ray.runner.job import run_job
from tests.support.jobs import (
    THING_CSV,
    detection_keys,
    fault_job_dict,
    images_for,
    outcome,
    read_tables,
)
from tests.support.s3proxy import FlakyS3Proxy

pytestmark = pytest.mark.integration

SCHEMA = "Bucket, Key, Size, LastModifiedDate, IsLatest, IsDeleteMarker"


def _client(moto_s3):
    return moto_s3.boto3_client()


def _inventory(moto_s3, dest: str, source: str, date: str, keys: list[str], fmt: str) -> str:
    """Publish an S3 Inventory report of ``keys`` (plus a delete marker and an old
    version) the way S3 lays it out; returns the configuration's folder URI."""
    rows = [(source, k, "100", "2026-12-01T00:00:00.000Z", "true", "false") for k in keys]
    rows.append((source, "img/deleted.png", "0", "2026-12-01T00:00:00.000Z", "true", "true"))
    rows.append((source, "img/old-version.png", "9", "2026-11-01T00:00:00.000Z", "false", "false"))
    base = f"inventory/{source}/nightly"
    if fmt == "CSV":
        text = "".join(
            ",".join(f'"{quote_plus(v) if i == 1 else v}"' for i, v in enumerate(r)) + "\n"
            for r in rows
        )
        data_key = f"{base}/data/{date}.csv.gz"
        moto_s3.put(dest, data_key, gzip.compress(text.encode()))
    else:
        cols = ["bucket", "key", "size", "last_modified_date", "is_latest", "is_delete_marker"]
        table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)})
        table = table.set_column(4, "is_latest", pa.array([r[4] == "true" for r in rows]))
        table = table.set_column(5, "is_delete_marker", pa.array([r[5] == "true" for r in rows]))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data_key = f"{base}/data/{date}.parquet"
        moto_s3.put(dest, data_key, buf.getvalue())
    manifest = {
        "sourceBucket": source,
        "destinationBucket": f"arn:aws:s3:::{dest}",
        "version": "2016-11-30",
        "fileFormat": fmt,
        "fileSchema": SCHEMA,
        "files": [{"key": data_key, "size": 1, "MD5checksum": "x"}],
    }
    moto_s3.put(dest, f"{base}/{date}/manifest.json", json.dumps(manifest))
    return f"s3://{dest}/{base}/"


@pytest.fixture(scope="module")
def lake(moto_s3, tmp_path_factory):
    """A source bucket with 8 images (one name with a space and a '+') and a concepts table."""
    source = moto_s3.new_bucket("lake")
    keys = []
    for i, (name, data) in enumerate(images_for(8)):
        key = f"img/{'a b+c-' if i == 3 else ''}{name}"
        moto_s3.put(source, key, data)
        keys.append(key)
    concepts = tmp_path_factory.mktemp("lake-prompts") / "concepts.csv"
    concepts.write_text(THING_CSV)
    return {"bucket": source, "keys": keys, "concepts": str(concepts)}


def _cfg(moto_s3, lake, tiny_checkpoint, output: str, opts=None, **input_) -> JobConfig:
    data = fault_job_dict(
        uris=[],
        storage_options=opts or moto_s3.storage_options,
        concepts=lake["concepts"],
        checkpoint=tiny_checkpoint,
        output=output,
        shard_size=3,
    )
    data["input"].update(input_)
    data["inference"]["images_per_batch"] = 1  # outputs compared across runs: no batch-mates
    return JobConfig.model_validate(data)


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_an_s3_inventory_report_is_the_input_and_a_grown_lake_costs_its_new_objects(
    ray_session, moto_s3, lake, tiny_checkpoint, fmt
):
    dest = moto_s3.new_bucket(f"inv-{fmt.lower()}")
    source, keys = lake["bucket"], lake["keys"]
    folder = _inventory(moto_s3, dest, source, "2026-12-01T01-00Z", keys[:6], fmt)
    out = f"s3://{dest}/labels"
    cfg = _cfg(moto_s3, lake, tiny_checkpoint, out, inventory=folder)
    first = run_job(cfg)
    assert first["plan"]["inputs"]["listed"] == 6 and first["inputs_processed"] == 6
    arrow = moto_s3.pyarrow_filesystem()
    images, detections = read_tables(f"{dest}/labels", arrow)
    uris = {f"s3://{source}/{k}" for k in keys[:6]}
    assert set(images.column("uri").to_pylist()) == uris, "live objects only, keys decoded"
    assert set(images.column("status").to_pylist()) == {"ok"}

    # The next night's report lists two more objects: only they are labelled.
    _inventory(moto_s3, dest, source, "2026-12-02T01-00Z", keys, fmt)
    second = run_job(cfg)
    assert second["plan"]["inputs"] == {
        "listed": 8, "done": 6, "new": 2, "new_images": 2, "new_videos": 0,
        "to_label": 2, "to_relabel": 0,
    }  # fmt: skip
    assert second["inputs_processed"] == 2
    again, more = read_tables(f"{dest}/labels", arrow)
    rows = {r["uri"]: r for r in again.to_pylist()}
    assert set(rows) == {f"s3://{source}/{k}" for k in keys}
    assert {rows[u]["run_id"] for u in uris} == {first["run_id"]}
    old = {k: n for k, n in detection_keys(more).items() if k[0] in
           {rows[u]["image_id"] for u in uris}}  # fmt: skip
    assert old == detection_keys(detections), "the first night's labels are untouched"


def test_a_crash_mid_run_on_a_throttled_store_resumes_to_the_undisturbed_output(
    ray_session, moto_s3, lake, tiny_checkpoint, monkeypatch
):
    """The driver dies after two shards of four commit (storage answering 20% of requests
    with 503 SlowDown all along); the next run folds the dead run's commits into the
    state, removes what it half-wrote, labels the rest; the output equals an undisturbed
    run's, every input exactly once."""
    source = lake["bucket"]
    clean_out = moto_s3.new_bucket("clean")
    uris = [f"s3://{source}/img/"]
    run_job(_cfg(moto_s3, lake, tiny_checkpoint, f"s3://{clean_out}/l", uris=uris))
    arrow = moto_s3.pyarrow_filesystem()
    want_images, want_detections = read_tables(f"{clean_out}/l", arrow)

    out = moto_s3.new_bucket("crash")
    real = pipelines.label_pipeline
    with FlakyS3Proxy(moto_s3.endpoint_url, fail_rate=0.2) as proxy:
        opts = proxy.storage_options(config_kwargs={"retries": {"max_attempts": 2}})
        cfg = _cfg(moto_s3, lake, tiny_checkpoint, f"s3://{out}/l", opts=opts, uris=uris)

        def dies_after_two(*args, **kwargs):
            for i, summary in enumerate(real(*args, **kwargs)):
                yield summary
                if i == 1:
                    raise ConnectionError("lost the driver's node")

        monkeypatch.setattr(pipelines, "label_pipeline", dies_after_two)
        with pytest.raises(ConnectionError):
            run_job(cfg)
        monkeypatch.setattr(pipelines, "label_pipeline", real)
        resumed = run_job(cfg)
        assert sum(proxy.injected_kinds.values()) > 0, "the store did throttle"
    (dead,) = resumed["plan"]["recovered_runs"]
    assert resumed["plan"]["recovered_runs"][dead]["committed"] >= 2
    assert resumed["inputs_processed"] + resumed["inputs_skipped_done"] == 8
    images, detections = read_tables(f"{out}/l", arrow)
    assert outcome(images) == outcome(want_images), "every input once, same outcome"
    got = detection_keys(detections)
    assert max(got.values()) == 1 and got == detection_keys(want_detections)


def test_planning_on_the_cluster_equals_planning_here(ray_session, moto_s3, lake, tiny_checkpoint):
    """plan.engine ray (Ray Data: listing tasks, a shuffle by hash bucket, consolidation on
    the cluster) gives the output plan.engine local gives, and a no-op resume after it."""
    uris = [f"s3://{lake['bucket']}/img/"]
    outs = {}
    for engine in ("local", "ray"):
        bucket = moto_s3.new_bucket(f"engine-{engine}")
        cfg = _cfg(moto_s3, lake, tiny_checkpoint, f"s3://{bucket}/l", uris=uris)
        cfg = cfg.model_copy(update={"plan": cfg.plan.model_copy(update={"engine": engine})})
        summary = run_job(cfg)
        assert summary["plan"]["engine"] == engine and summary["inputs_processed"] == 8
        again = run_job(cfg)
        assert again["inputs_processed"] == 0 and again["plan"]["inputs"]["done"] == 8
        outs[engine] = read_tables(f"{bucket}/l", moto_s3.pyarrow_filesystem())
    assert outcome(outs["ray"][0]) == outcome(outs["local"][0])
    assert detection_keys(outs["ray"][1]) == detection_keys(outs["local"][1])
