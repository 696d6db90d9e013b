"""``sam3ray.label`` in a user's own Ray Data pipeline, on the session's local Ray.

The reference is the job itself: ``run_job`` over the same image folder. The
operator must give the same detections (image ids, class ids, scores within
1e-5, the same masks), carry the user's key columns into every row, and turn
every input it cannot label into one error row (the dataset never fails).
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from sam3ray import InferenceConfig, ModelConfig, ResourcesConfig, label
from sam3ray.core.errors import ConfigError
from sam3ray.core.ids import input_id
from sam3ray.core.masks import rle_iou
from sam3ray.runner.operator import LABEL_SCHEMA
from sam3ray.sources.images import decode_image

REPO = Path(__file__).resolve().parents[2]
N_GOOD = 6
#: Small single-CPU actor, as the job tests use (2 CPUs in the session's Ray).
RESOURCES = {"gpus_per_actor": 0, "cpus_per_actor": 0.5, "actors": (1, 1), "decode_cpus": 0.5}


@pytest.fixture(scope="module")
def lake(it, tmp_path_factory, tiny_checkpoint, concepts_csv):
    """An image folder (6 scenes, a truncated JPEG, a text file named .jpg) and a Parquet
    table of it with the user's own columns, plus a missing file and a null URI."""
    root = tmp_path_factory.mktemp("lake")
    images = root / "images"
    good = it.write_images(images, N_GOOD)
    truncated, text = images / "cut.jpg", images / "notes.jpg"
    truncated.write_bytes(it.image_bytes(40, "JPEG")[:300])
    text.write_text("<html>not an image</html>")
    uris = [*good, str(truncated), str(text), str(images / "missing.jpg"), None]
    table = pa.table({
        "asset_id": pa.array(range(100, 100 + len(uris)), pa.int64()),
        "uri": pa.array(uris, pa.string()),
        "split": pa.array(["train"] * (len(uris) - 1) + ["test"]),
    })  # fmt: skip
    pq.write_table(table, root / "images.parquet")
    return {"root": root, "images": images, "good": good, "table": root / "images.parquet",
            "uris": uris, "ckpt": tiny_checkpoint, "concepts": concepts_csv}  # fmt: skip


@pytest.fixture(scope="module")
def job_output(it, lake, ray_session):
    """What ``run_job`` writes for the image folder: (images, detections) tables."""
    from sam3ray.runner.job import run_job

    out = lake["root"] / "job-out"
    cfg = it.job_config(concepts=lake["concepts"], checkpoint=lake["ckpt"], output=str(out),
                        uris=[str(lake["images"])], shard_size=4)  # fmt: skip
    run_job(cfg)
    images, detections = it.read_output(str(out))
    assert images.num_rows == N_GOOD + 2
    return images, detections


def _sections(lake) -> tuple[ModelConfig, InferenceConfig]:
    from tests.support.jobs import INFERENCE

    model = ModelConfig(checkpoint=lake["ckpt"], device="cpu", dtype="float32")
    return model, InferenceConfig(**INFERENCE)


def _by_key(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["image_id"], str(r["class_id"]))].append(r)
    return {k: sorted(v, key=lambda r: -r["score"]) for k, v in out.items()}


def assert_same_detections(got: list[dict], want: list[dict]) -> None:
    """Same (image_id, class_id) keys and counts, scores within 1e-5, masks IoU >= 0.99."""
    assert want, "the job found nothing: a vacuous comparison"
    g, w = _by_key(got), _by_key(want)
    assert set(g) == set(w)
    for key, rows in w.items():
        assert len(g[key]) == len(rows), key
        np.testing.assert_allclose([r["score"] for r in g[key]], [r["score"] for r in rows],
                                   rtol=0, atol=1e-5, err_msg=str(key))  # fmt: skip
        for a, b in zip(g[key], rows, strict=True):
            assert list(a["mask_size"]) == list(b["mask_size"])
            assert rle_iou(a["mask_rle"], b["mask_rle"], b["mask_size"]) >= 0.99


def _ok(table: pa.Table) -> list[dict]:
    return table.filter(pc.equal(table["status"], "ok")).to_pylist()


def _errors(table: pa.Table) -> dict[str, dict]:
    rows = table.filter(pc.equal(table["status"], "error")).to_pylist()
    return {r["uri"]: r for r in rows}


def test_table_of_uris_through_the_job_script(it, lake, job_output, tmp_path):
    """jobs/label_table.py: read_parquet → label → write_parquet(partition_cols=["class_id"])."""
    spec = importlib.util.spec_from_file_location("label_table", REPO / "jobs" / "label_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = it.job_config(concepts=lake["concepts"], checkpoint=lake["ckpt"],
                        output=str(tmp_path / "unused"), uris=[str(lake["images"])])  # fmt: skip
    (tmp_path / "job.yaml").write_text(it.config_yaml(cfg))
    out = tmp_path / "labels"
    code = script.main([str(lake["table"]), str(out), "--config", str(tmp_path / "job.yaml"),
                        "--keep", "asset_id", "--only", "split=train"])  # fmt: skip
    assert code == 0
    assert (out / "class_id=__HIVE_DEFAULT_PARTITION__").is_dir()  # the error rows
    got = pds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert {"asset_id", *LABEL_SCHEMA.names} == set(got.column_names)  # `split` was not kept
    images, detections = job_output
    assert_same_detections(_ok(got), detections.to_pylist())
    asset = {u: 100 + i for i, u in enumerate(lake["uris"])}
    for r in got.to_pylist():  # the user's key column is carried into every row
        assert r["asset_id"] == asset[r["uri"]], r["uri"]
        assert r["image_id"] == input_id(r["uri"])
    errors = _errors(got)
    job_errors = {r["uri"]: r["error_reason"] for r in images.to_pylist() if r["status"] == "error"}
    assert {u: e["error_reason"] for u, e in errors.items()} == {
        **job_errors,
        str(lake["images"] / "missing.jpg"): "not_found",
    }  # the null URI is in the `test` split, filtered out before labelling
    assert set(job_errors.values()) == {"truncated", "not_an_image"}
    for e in errors.values():  # one row per bad input, every detection field null
        assert e["class_id"] is None and e["score"] is None and e["mask_rle"] is None
        assert e["error"] and e["run_id"] and e["model"]


def test_bytes_with_their_paths_and_a_null(it, lake, job_output, ray_session):
    """Encoded bytes; ``uri_column`` names them, so ids join with the job's output."""
    rows = [{"path": u, "data": Path(u).read_bytes(), "key": f"k{i}"}
            for i, u in enumerate(lake["good"])]  # fmt: skip
    nowhere = lake["images"] / "nowhere.jpg"  # given as file://, named as the job names it
    rows += [{"path": None, "data": b"garbage", "key": "junk"},
             {"path": f"file://{nowhere}", "data": None, "key": "null"}]  # fmt: skip
    model, inference = _sections(lake)
    ds = ray_session.data.from_items(rows)
    out = label(ds, column="data", kind="bytes", uri_column="path", concepts=lake["concepts"],
                model=model, inference=inference, resources=ResourcesConfig(**RESOURCES),
                keep=["key"])  # fmt: skip
    got = pa.concat_tables(ray_session.get(out.to_arrow_refs()))
    _, detections = job_output
    assert_same_detections(_ok(got), detections.to_pylist())
    errors = {r["key"]: r for r in got.filter(pc.equal(got["status"], "error")).to_pylist()}
    assert set(errors) == {"junk", "null"}
    assert errors["junk"]["error_reason"] == "not_an_image"
    assert errors["junk"]["uri"].startswith("sha1:")  # no path: named by its content
    assert errors["null"]["error_reason"] == "empty" and errors["null"]["uri"] == str(nowhere)
    assert errors["null"]["image_id"] == input_id(str(nowhere))
    keys = {u: f"k{i}" for i, u in enumerate(lake["good"])}
    assert all(r["key"] == keys[r["uri"]] for r in _ok(got))


def test_arrays_duplicates_and_a_bad_array(lake, job_output, ray_session):
    """Decoded arrays of several shapes (Ray's variable-shape tensors); the same image
    twice keeps its own rows; an RGBA array is one error row. Default resources ask for
    a quarter GPU: on this GPU-less Ray the actors run on CPU instead of waiting."""
    arrays = [decode_image(Path(u).read_bytes(), max_pixels=10**8) for u in lake["good"]]
    items = [{"pixels": a, "n": i} for i, a in enumerate(arrays)]
    rgba = np.dstack([arrays[1], np.full(arrays[1].shape[:2], 255, np.uint8)])
    items += [{"pixels": arrays[0], "n": 50}, {"pixels": rgba, "n": 99}]
    model, inference = _sections(lake)
    ds = ray_session.data.from_items(items)
    out = label(ds, column="pixels", kind="array", concepts=lake["concepts"], model=model,
                inference=inference, resources=ResourcesConfig(actors=(1, 1)),
                keep=["n"])  # fmt: skip
    got = pa.concat_tables(ray_session.get(out.to_arrow_refs()))
    ok = _ok(got)
    _, detections = job_output
    for r in ok:  # no uri column: named by content, an id like any other
        assert r["uri"].startswith("sha1:") and r["image_id"] == input_id(r["uri"])
    as_job = [{**r, "image_id": input_id(lake["good"][r["n"]])} for r in ok if r["n"] < 50]
    assert_same_detections(as_job, detections.to_pylist())
    first = [r for r in ok if r["n"] == 0]
    again = [r for r in ok if r["n"] == 50]
    assert first and len(again) == len(first)  # the duplicate has its own rows
    assert {r["image_id"] for r in again} == {r["image_id"] for r in first}
    (bad,) = got.filter(pc.equal(got["status"], "error")).to_pylist()
    assert bad["n"] == 99 and bad["error_reason"] == "unsupported" and ", 4)" in bad["error"]


def test_refused_before_any_work(lake, ray_session, tmp_path):
    """Config mistakes stop the call (ConfigError, the CLI's exit 2), not the dataset later."""
    model, inference = _sections(lake)
    ds = ray_session.data.from_items([{"uri": lake["good"][0], "uri_2": "x"}])
    kw = {"concepts": lake["concepts"], "model": model, "inference": inference}
    with pytest.raises(ConfigError, match=r"\['nope'\] are not in the dataset"):
        label(ds, column="nope", **kw)
    with pytest.raises(ConfigError, match="collide"):
        label(ds, column="uri", keep=["uri"], **kw)
    with pytest.raises(ConfigError, match="kind"):
        label(ds, column="uri", kind="video", **kw)
    with pytest.raises(ConfigError, match="checkpoint: not found"):
        label(ds, column="uri", **{**kw, "model": ModelConfig(checkpoint=str(tmp_path / "x.pt"))})
    cuda = ModelConfig(checkpoint=lake["ckpt"], device="cuda")
    with pytest.raises(ConfigError, match="no GPUs"):
        label(ds, column="uri", **{**kw, "model": cuda})
    bad_table = tmp_path / "concepts.csv"
    bad_table.write_text("class_id,name,text\nnot-a-uuid,cat,cat\n")
    with pytest.raises(ConfigError, match="row 2"):
        label(ds, column="uri", **{**kw, "concepts": str(bad_table)})
