"""The image job end to end against S3: a real moto server on 127.0.0.1, a real local Ray.

Inputs, the concept table and the tiny checkpoint are objects in one bucket;
the actors (image reads, in parallel, and the checkpoint download) and the writer
tasks all talk to the server over HTTP, and the output is written back to the bucket.
What was written is read back with plain pyarrow (its own S3 client), pandas
(s3fs) and boto3 listings, never through sam3ray's own reader.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from sam3ray.runner.job import run_job

pytestmark = pytest.mark.integration

N_IMAGES = 12
_PART = re.compile(r"detections/class_id=([0-9a-f-]{36})/part-(s[0-9a-f]+)\.parquet")


def keys_under(client, bucket: str, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (relative to it)."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
    return sorted(keys)


@pytest.fixture(scope="module")
def s3_job(it, moto_s3, ray_session, tiny_checkpoint, concepts_csv, tmp_path_factory):
    """12 images in two folders, shard_size 2 (a shard holds at most 4: >= 3 shards)."""
    bucket = moto_s3.new_bucket("sam3ray-it")
    uris = it.upload_images(moto_s3, bucket, "images", N_IMAGES)
    concepts = moto_s3.put(bucket, "prompts/concepts.csv", Path(concepts_csv).read_bytes())
    checkpoint = moto_s3.put(bucket, "models/sam3-tiny.pt", Path(tiny_checkpoint).read_bytes())
    cache = tmp_path_factory.mktemp("checkpoint-cache")
    cfg = it.job_config(
        uris=[f"s3://{bucket}/images/"],
        concepts=concepts,
        checkpoint=checkpoint,
        output=f"s3://{bucket}/labels/job",
        storage_options=moto_s3.storage_options,
        cache_dir=str(cache),
        shard_size=2,
    )
    summary = run_job(cfg)
    return {
        "bucket": bucket,
        "uris": uris,
        "cfg": cfg,
        "summary": summary,
        "cache": cache,
        "prefix": "labels/job/",
    }


def test_s3_images_invariant_partitions_and_summary(it, moto_s3, s3_job):
    s, bucket = s3_job["summary"], s3_job["bucket"]
    images, detections = it.read_output(
        f"{bucket}/labels/job", filesystem=moto_s3.pyarrow_filesystem()
    )
    it.check_images_invariant(images, detections, s3_job["uris"])
    assert all(u.startswith(f"s3://{bucket}/images/") for u in images.column("uri").to_pylist())
    assert set(images.column("status").to_pylist()) == {"ok"}
    assert (s["status"], s["inputs_processed"], s["ok"], s["errors"]) == ("succeeded", 12, 12, 0)
    assert s["detections"] == detections.num_rows > 0

    # The model came from the bucket: the actor copied it into the configured cache.
    cached = [p for p in s3_job["cache"].iterdir() if p.name.endswith("sam3-tiny.pt")]
    assert len(cached) == 1 and cached[0].stat().st_size > 1_000_000
    loads = s["actors"]["model_loads_per_actor"]
    assert loads and all(n == 1 for n in loads)
    assert s["shards"]["done_now"] > s["actors"]["count"]

    # The bucket holds exactly: detections per (class, shard), images and a marker per
    # shard, the run summary, and the state (the run's plan, one commit key per shard,
    # its index and shards-table files). No temporary or stray objects.
    keys = keys_under(moto_s3.boto3_client(), bucket, s3_job["prefix"])
    shards = s["shards"]["done_now"]
    det_keys = [k for k in keys if k.startswith("detections/")]
    assert all(_PART.fullmatch(k) for k in det_keys), det_keys
    files_per_class = Counter(_PART.fullmatch(k).group(1) for k in det_keys)
    assert set(files_per_class) == set(detections.column("class_id").to_pylist())
    assert set(files_per_class) <= set(it.CLASS_IDS)
    assert all(n <= shards for n in files_per_class.values()), files_per_class
    assert len([k for k in keys if k.startswith("images/")]) == shards
    assert len([k for k in keys if k.startswith("_markers/")]) == shards
    assert [k for k in keys if k.startswith("runs/")] == [f"runs/{s['run_id']}.json"]
    state = [k for k in keys if k.startswith("_state/")]
    run = s["run_id"]
    commits = [k for k in state if k.startswith(f"_state/commits/{run}/")]
    assert len(commits) == shards and f"_state/runs/{run}.json" in state
    assert [k for k in state if k.startswith("_state/plans/")] == [
        f"_state/plans/{run}/part-00000.parquet"
    ]
    index = [k for k in state if k.startswith("_state/index/")]
    assert 1 <= len(index) <= 12 and all(k.endswith(f"/{run}.parquet") for k in index)
    tables = [k for k in state if k.startswith("_state/shards/")]
    assert 1 <= len(tables) <= shards
    assert len(state) == len(commits) + 2 + len(index) + len(tables)
    assert len(keys) == len(det_keys) + 2 * shards + 1 + len(state)

    # pandas over s3fs reads the same partitioned dataset.
    pdf = pd.read_parquet(
        f"s3://{bucket}/labels/job/detections", storage_options=moto_s3.storage_options
    )
    assert len(pdf) == s["detections"]
    assert pdf.groupby("concept").size().to_dict() == s["detections_by_concept"]


def test_s3_output_matches_engine_run_directly(it, moto_s3, s3_job, direct_engine):
    _, detections = it.read_output(
        f"{s3_job['bucket']}/labels/job", filesystem=moto_s3.pyarrow_filesystem()
    )
    want = it.engine_reference(direct_engine, s3_job["uris"], moto_s3.storage_options)
    it.assert_same_as_engine(it.scores_by_key(detections), want)


def test_s3_resume_labels_only_new_objects(it, moto_s3, s3_job):
    """On a copy of the output: a resume with nothing new reads the state (no marker GETs,
    no actor); two objects uploaded since are labelled alone, in a new shard."""
    client, bucket = moto_s3.boto3_client(), s3_job["bucket"]
    first = s3_job["summary"]
    for key in keys_under(client, bucket, s3_job["prefix"]):
        client.copy_object(
            Bucket=bucket,
            Key=f"labels/resume/{key}",
            CopySource={"Bucket": bucket, "Key": f"{s3_job['prefix']}{key}"},
        )
    base = s3_job["cfg"]
    out = f"s3://{bucket}/labels/resume"
    cfg = base.model_copy(update={"output": base.output.model_copy(update={"uri": out})})
    arrow_fs = moto_s3.pyarrow_filesystem()
    before = it.detection_set(it.read_output(f"{bucket}/labels/resume", arrow_fs)[1])

    again = run_job(cfg)
    assert again["inputs_processed"] == 0 and again["shards"]["done_now"] == 0
    assert again["inputs_skipped_done"] == N_IMAGES
    assert again["timing_s"]["total"] < 10 and again["actors"]["count"] == 0

    added = it.upload_images(moto_s3, bucket, "images/later", 2, start=50)
    try:
        more = run_job(cfg)
    finally:  # the module's other tests list this prefix
        for uri in added:
            client.delete_object(Bucket=bucket, Key=uri.split(f"{bucket}/", 1)[1])
    assert more["inputs_processed"] == 2 and more["shards"]["new"] == 1
    images, detections = it.read_output(f"{bucket}/labels/resume", arrow_fs)
    it.check_images_invariant(images, detections, s3_job["uris"] + added)
    runs = {r["uri"]: r["run_id"] for r in images.to_pylist()}
    assert {runs[u] for u in added} == {more["run_id"]}
    assert {runs[u] for u in s3_job["uris"]} == {first["run_id"]}
    old = {d for d in it.detection_set(detections) if d[0] not in {it.input_id(u) for u in added}}
    assert old == before
