"""Security promises, each checked against the code path a job really takes.

- Only validated, canonical UUIDs become path components; concept names and texts never do.
- An output prefix inside an input prefix is refused before anything runs.
- Checkpoints load with ``weights_only``: a pickled object in one is refused, never run.
- Storage credentials reach no log line, error row, summary or output file.
- The decompression-bomb limit is configurable, with a safe default.
- Manifest entries of a job on object storage cannot reach local files or other hosts.
"""

from __future__ import annotations

import logging
import os
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3ray.config import (
    ConfigError,
    InputConfig,
    JobConfig,
    redact,
    validate_paths,
)
from sam3ray.core.errors import DecodeError, InputError, PromptTableError
from sam3ray.core.ids import input_id
from sam3ray.model.loader import CheckpointError, read_checkpoint
from sam3ray.output.layout import detections_path
from sam3ray.output.schema import detections_table, images_table
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.sources.images import decode_image
from sam3ray.sources.listing import list_inputs
from sam3ray.sources.prompts import load_concepts
from sam3ray.stages.decode import DecodedImage, ImageReader
from sam3ray.storage.location import Location
from tests.support.bad_inputs import DEFAULT_MAX_PIXELS, png_bomb
from tests.support.images import encode
from tests.support.jobs import THING
from tests.support.s3proxy import FlakyS3Proxy

CID = THING  # a canonical UUID
EVIL = "../../../../tmp/evil/..\\x"


def write_shard(out: Path, shard_id: str, det, img) -> None:
    ShardWriter(Location(str(out))).write(ShardOutput(shard_id, "r1", det, img))


def decode(input_cfg: InputConfig, uris: list[str], image_ids: list[str]) -> list[DecodedImage]:
    """What the job's image actor makes of one shard of ``uris`` (its reader)."""
    return list(ImageReader(input_cfg, threads=2, window=2).read(uris, image_ids))


# -- 1. path components -------------------------------------------------------------------


def _shard_tables(uri: str, concept: str, class_id: str = CID):
    image_id = input_id(uri)
    det = detections_table(
        [
            {
                "run_id": "r1",
                "image_id": image_id,
                "uri": uri,
                "class_id": class_id,
                "concept": concept,
                "query": f'text:"{concept}"',
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
    img = images_table(
        [
            {
                "run_id": "r1",
                "image_id": image_id,
                "uri": uri,
                "shard_id": "s" + image_id,
                "status": "ok",
                "n_detections": 1,
                "width": 8,
                "height": 8,
            }
        ]
    )
    return det, img


def test_concept_names_and_texts_never_become_paths(tmp_path):
    table = tmp_path / "concepts.csv"
    table.write_text(f"class_id,name,text\n{CID.upper()},{EVIL},a/../b\n", encoding="utf-8")
    (concept,) = load_concepts(Location(str(table))).concepts
    assert concept.class_id == CID  # canonical form: the only thing a path is made of
    uri = "s3://bucket/img.png"
    det, img = _shard_tables(uri, concept.name)
    out = tmp_path / "out"
    write_shard(out, "s" + input_id(uri), det, img)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    shard = "s" + input_id(uri)
    assert files == [
        f"_markers/{shard}.json",
        f"detections/class_id={CID}/part-{shard}.parquet",
        f"images/part-{shard}.parquet",
    ]
    assert not (tmp_path / "tmp").exists() and not Path("/tmp/evil").exists()
    import pyarrow.parquet as pq

    written = pq.read_table(out / files[1])
    assert written.column("concept").to_pylist() == [EVIL]  # kept as data, only as data


@pytest.mark.parametrize("bad", ["../../etc/passwd", "not-a-uuid", "", "cat"])
def test_class_ids_that_are_not_uuids_stop_the_job_at_the_table(tmp_path, bad):
    table = tmp_path / "concepts.csv"
    table.write_text(f"class_id,name,text\n{CID},ok,ok\n{bad},x,x\n", encoding="utf-8")
    with pytest.raises(PromptTableError, match="row 3: class_id"):
        load_concepts(Location(str(table)))


@pytest.mark.parametrize("bad", ["../x", CID.upper(), "{" + CID + "}", f"{CID}/.."])
def test_writer_refuses_non_canonical_class_ids_before_any_byte(tmp_path, bad):
    det, img = _shard_tables("s3://b/i.png", "thing", class_id=bad)
    shard = "s" + input_id("s3://b/i.png")
    with pytest.raises(ValueError, match="class_id"):
        write_shard(tmp_path / "out", shard, det, img)
    with pytest.raises(ValueError, match="class_id"):
        detections_path(bad, "s1")
    assert not (tmp_path / "out").exists()


# -- 2. output inside input ---------------------------------------------------------------


def _job(tmp_path: Path, uris: list[str], output: str) -> JobConfig:
    concepts = tmp_path / "c.csv"
    concepts.write_text(f"class_id,name,text\n{CID},thing,thing\n", encoding="utf-8")
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"not loaded here")
    return JobConfig.model_validate(
        {
            "input": {"uris": uris},
            "prompts": {"concepts": str(concepts)},
            "model": {"checkpoint": str(ckpt)},
            "output": {"uri": output},
        }
    )


@pytest.mark.parametrize(
    "uris,output",
    [
        (["s3://bkt/images/"], "s3://bkt/images/labels"),
        (["s3://bkt/images"], "s3a://bkt/images//labels/"),
        (["s3://bkt/images/**/*.jpg"], "s3://bkt/images/2024/labels"),
        (["s3://bkt/img*"], "s3://bkt/img_labels"),
        (["{tmp}/imgs"], "{tmp}/imgs/out"),
        (["{tmp}/imgs/*.png"], "{tmp}/imgs/../imgs/labels"),
    ],
)
def test_output_inside_an_input_prefix_is_refused(tmp_path, uris, output):
    (tmp_path / "imgs").mkdir()
    fmt = {"tmp": str(tmp_path)}
    cfg = _job(tmp_path, [u.format(**fmt) for u in uris], output.format(**fmt))
    with pytest.raises(ConfigError, match="lies inside input"):
        validate_paths(cfg)


def test_output_beside_the_input_is_fine(tmp_path):
    (tmp_path / "imgs").mkdir()
    validate_paths(_job(tmp_path, [str(tmp_path / "imgs")], str(tmp_path / "imgs-labels")))
    validate_paths(_job(tmp_path, ["s3://bkt/images/"], "s3://bkt/labels/"))


# -- 3. checkpoints: weights only ------------------------------------------------------------


class _Payload:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.mkdir, (self.canary,))


def test_a_checkpoint_holding_pickled_code_is_refused_not_run(tmp_path):
    import torch

    canary = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"detector.x": torch.zeros(1)}, "extra": _Payload(str(canary))}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(str(path))
    from sam3ray import load_sam3_image_model

    with pytest.raises(CheckpointError):
        load_sam3_image_model(str(path), device="cpu")
    assert not canary.exists(), "unpickling ran code from the checkpoint"
    # The same file loaded the unsafe way would run the payload: the test is not vacuous.
    torch.load(path, weights_only=False)
    assert canary.is_dir()


# -- 4. credentials ------------------------------------------------------------------------


@pytest.fixture
def cli_logging():
    """Logging as ``sam3ray -v run`` sets it up (restored afterwards).

    The CLI keeps botocore & co. at WARNING even with -v: botocore's own DEBUG
    output prints request headers, i.e. the access key id and any session token.
    """
    from sam3ray.cli.main import _setup_logging

    names = ("botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "filelock")
    saved = {n: logging.getLogger(n).level for n in names}
    _setup_logging(verbose=True)
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_credentials_stay_out_of_logs_errors_and_summaries(moto_s3, caplog, capfd, cli_logging):
    key_id, secret = f"AKIA{uuid.uuid4().hex[:12].upper()}", f"sec-{uuid.uuid4().hex}"
    bucket = moto_s3.new_bucket("creds")
    good = moto_s3.put(bucket, "in/a.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    caplog.set_level(logging.DEBUG)  # every sam3ray record, retries' warnings included
    with FlakyS3Proxy(moto_s3.endpoint_url, fail_rate=0.5, seed=3) as proxy:
        opts = {
            "key": key_id,
            "secret": secret,
            "token": f"tok-{secret}",
            "client_kwargs": {"endpoint_url": proxy.endpoint_url, "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}},
        }
        cfg = InputConfig(uris=[f"s3://{bucket}/in/"], storage_options=opts, max_pixels=10**6)
        refs = list_inputs(cfg)
        uris = [r.uri for r in refs] + [f"s3://{bucket}/in/missing.png"]
        decoded = decode(cfg, uris, [r.image_id for r in refs] + ["0" * 16])
        assert Location(good, opts).read_bytes()
    assert [d.ok for d in decoded] == [True, False] and decoded[1].error_reason == "not_found"
    job = JobConfig.model_validate(
        {
            "input": {"uris": [good], "storage_options": opts},
            "prompts": {"concepts": "c.csv"},
            "model": {"checkpoint": "m.pt", "storage_options": {"aws_secret_access_key": secret}},
            "output": {"uri": f"s3://{key_id}:{secret}@bucket/out"},
        }
    )
    summary_config = str(redact(job))
    printed = capfd.readouterr()
    texts = {
        "logs": caplog.text,
        "stdout": printed.out,
        "stderr": printed.err,
        "errors": str([d.error for d in decoded]),
        "summary config": summary_config,
    }
    assert proxy.injected, "no retry path was exercised"
    for where, text in texts.items():
        assert secret not in text and key_id not in text, f"credential in {where}"
    assert "***" in summary_config


# -- 5. decompression bombs ------------------------------------------------------------------


def test_bomb_limit_has_a_safe_default_and_is_configurable(tmp_path):
    default = InputConfig(uris=["x"]).max_pixels
    assert default == DEFAULT_MAX_PIXELS  # Pillow's own error threshold (2x its warning)
    assert InputConfig(uris=["x"], max_pixels=5_000).max_pixels == 5_000
    with pytest.raises(ValueError):
        InputConfig(uris=["x"], max_pixels=0)

    bomb = png_bomb()  # 200 MP of real, compressed pixel data in ~25 KB
    before = Image.MAX_IMAGE_PIXELS
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DecodeError) as err:
            decode_image(bomb, max_pixels=default)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.reason == "too_large"
    assert peak < 20 * 2**20 and time.perf_counter() - t0 < 5  # refused from the header
    assert before == Image.MAX_IMAGE_PIXELS  # Pillow's global limit untouched

    # The configured limit is the one the job's decode stage applies.
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    small = decode(InputConfig(uris=[str(path)], max_pixels=9_999), [str(path)], ["0" * 16])
    assert [d.error_reason for d in small] == ["too_large"]
    fits = decode(InputConfig(uris=[str(path)], max_pixels=10_000), [str(path)], ["0" * 16])
    assert [d.ok for d in fits] == [True]


# -- 6. manifests cannot escape the object store ------------------------------------------


ESCAPES = [
    "/etc/passwd",
    "file:///etc/passwd",
    "FILE:///etc/passwd",
    "file:/etc/passwd",
    "local:///etc/passwd",
    "../../etc/passwd",
    "~/.aws/credentials",
    "simplecache::file:///etc/passwd",
    "simplecache:///etc/passwd",
    "zip://passwd::file:///etc/passwd.zip",
    "tar:///etc/passwd",
    "memory:///secret",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://example.com/x.jpg",
]


@pytest.mark.parametrize("entry", ESCAPES)
def test_manifest_entries_cannot_leave_the_object_store(moto_s3, entry):
    bucket = moto_s3.new_bucket("manifest")
    ok = moto_s3.put(bucket, "in/a.jpg", b"x")
    manifest = moto_s3.put(bucket, "m.txt", f"{ok}\n{entry}\n")
    cfg = InputConfig(manifest=manifest, storage_options=moto_s3.storage_options)
    with pytest.raises(InputError, match=r"m.txt line 2: .*(not allowed)"):
        list_inputs(cfg)
    # The same job may name other objects of its own store (s3a:// is s3://).
    fine = moto_s3.put(bucket, "m2.txt", f"{ok}\ns3a://{bucket}/in/a.jpg\n")
    refs = list_inputs(InputConfig(manifest=fine, storage_options=moto_s3.storage_options))
    assert [r.uri for r in refs] == [ok, f"s3a://{bucket}/in/a.jpg"]
