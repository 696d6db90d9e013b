"""The writer on a local directory and on moto S3: layout, readers, commit order, resume."""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from sam3ray import output, output_io
from sam3ray.orphans import reconcile_orphans, trim_orphan
from sam3ray.output import (
    DETECTIONS_SCHEMA,
    IMAGES_SCHEMA,
    Marker,
    ShardWriter,
    clear_output,
    detections_dataset,
    detections_table,
    images_dataset,
    images_table,
    scan_markers,
    write_run_summary,
)
from sam3ray.shards import members_hash
from sam3ray.types import stable_id

RUN = "run-20260101-abc"
CAT = "123e4567-e89b-42d3-a456-426614174000"
DOG = "00000000-0000-4000-8000-000000000001"
SHARD = "s" + stable_id("s3://src/img/0.jpg")


# -- backends: a local directory and the session's moto S3 server (tests/conftest.py) ------


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> tuple[str, dict[str, Any]]:
    if request.param == "local":
        return str(tmp_path / "labels"), {}
    s3 = request.getfixturevalue("moto_s3")
    return f"s3://{s3.new_bucket('sam3ray-out')}/labels", dict(s3.storage_options)


# -- data ------------------------------------------------------------------------------------


def det(uri: str, class_id: str, score: float, frame_index: int | None = None) -> dict:
    return {
        "run_id": RUN,
        "image_id": stable_id(uri),
        "uri": uri,
        "frame_index": frame_index,
        "class_id": class_id,
        "concept": "cat" if class_id == CAT else "dog",
        "query": 'text:"cat"',
        "score": score,
        "box": np.array([1.0, 2.0, 30.0, 40.0]),
        "mask_rle": "abc",
        "mask_size": [48, 64],
        "area": 100,
        "width": 64,
        "height": 48,
        "model": "sam3-tiny@0123abcd",
    }


def image(uri: str, status: str = "ok", n: int = 0, shard_id: str = SHARD) -> dict:
    row = {"run_id": RUN, "image_id": stable_id(uri), "uri": uri, "shard_id": shard_id}
    row.update(status=status, n_detections=n, decode_ms=1.5, infer_ms=2.5)
    if status == "error":
        row.update(error="cannot identify image file", error_reason="decode_error")
    else:
        row.update(width=64, height=48)
    return row


def tables(classes=(CAT, DOG)) -> tuple[pa.Table, pa.Table]:
    """Two ok images with two detections per class, one error image."""
    uris = [f"s3://src/img/{i}.jpg" for i in range(3)]
    dets = [det(u, c, s) for u in reversed(uris[:2]) for c in classes for s in (0.5, 0.9)]
    imgs = [image(u, n=2 * len(classes)) for u in uris[:2]] + [image(uris[2], "error")]
    return detections_table(dets), images_table(imgs)


def files_under(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


# -- round trip ------------------------------------------------------------------------------


def test_write_shard_round_trip(out):
    uri, so = out
    det_t, img_t = tables()
    marker = ShardWriter(uri, so).write_shard(SHARD, "h1", det_t, img_t, RUN)

    assert marker.files == (
        f"detections/class_id={DOG}/part-{SHARD}.parquet",
        f"detections/class_id={CAT}/part-{SHARD}.parquet",
        f"images/part-{SHARD}.parquet",
    )
    assert (marker.n_inputs, marker.n_ok, marker.n_error, marker.n_detections) == (3, 2, 1, 8)
    assert scan_markers(uri, so) == {SHARD: marker}

    got = detections_dataset(uri, so).to_table()
    assert got.num_rows == 8
    assert got.schema.names == DETECTIONS_SCHEMA.names
    assert got.schema.field("box").type.list_size == 4
    assert sorted(got.column("class_id").to_pylist()) == [DOG] * 4 + [CAT] * 4
    assert got.column("mask_rle").to_pylist()[0] == b"abc"
    assert got.column("created_at").type == pa.timestamp("us", tz="UTC")
    only_cat = detections_dataset(uri, so).to_table(filter=ds.field("class_id") == CAT)
    assert only_cat.num_rows == 4 and set(only_cat.column("concept").to_pylist()) == {"cat"}

    imgs = images_dataset(uri, so).to_table()
    assert imgs.schema == IMAGES_SCHEMA
    assert sorted(imgs.column("status").to_pylist()) == ["error", "ok", "ok"]

    fs, root = output.filesystem(uri, so)
    cat_file = f"{root}/detections/class_id={CAT}/part-{SHARD}.parquet"
    with fs.open(cat_file, "rb") as f:
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.metadata[b"sam3ray.class_id"] == CAT.encode()
        assert "class_id" not in pf.schema_arrow.names  # lives in the directory name
        assert pf.metadata.row_group(0).column(0).statistics.has_min_max
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        rows = pf.read().select(["image_id", "score"]).to_pylist()
    assert rows == sorted(rows, key=lambda r: (r["image_id"], -r["score"]))

    if so:  # generic readers over S3 too
        pdf = pd.read_parquet(f"{uri}/detections", storage_options=so)
        assert len(pdf) == 8 and set(pdf["class_id"].astype(str)) == {CAT, DOG}
        arrow_fs = output.arrow_filesystem(fs)
        hive = ds.dataset(f"{root}/detections", filesystem=arrow_fs, partitioning="hive")
        assert hive.to_table().num_rows == 8


def test_generic_readers_on_local_output(tmp_path):
    uri = str(tmp_path / "labels")
    ShardWriter(uri).write_shard(SHARD, "h1", *tables(), RUN)

    hive = ds.dataset(f"{uri}/detections", format="parquet", partitioning="hive").to_table()
    assert hive.num_rows == 8
    assert set(hive.column("class_id").to_pylist()) == {CAT, DOG}

    glob = f"{uri}/detections/*/*.parquet"
    counts = duckdb.sql(
        f"select class_id, count(*) from read_parquet('{glob}', hive_partitioning=true) "
        "group by 1 order by 1"
    ).fetchall()
    assert counts == [(DOG, 4), (CAT, 4)]

    pdf = pd.read_parquet(f"{uri}/detections")
    assert len(pdf) == 8 and set(pdf["class_id"].astype(str)) == {CAT, DOG}
    assert len(pd.read_parquet(f"{uri}/images")) == 3


def test_empty_output_gives_empty_datasets(tmp_path):
    uri = str(tmp_path / "nothing")
    assert detections_dataset(uri).to_table().schema == DETECTIONS_SCHEMA
    assert images_dataset(uri).count_rows() == 0
    assert scan_markers(uri) == {}


def test_shard_without_detections_writes_images_and_marker(tmp_path):
    uri = str(tmp_path / "labels")
    _, img_t = tables()
    zeros = pa.array([0, 0, 0], pa.int32())
    img_t = img_t.set_column(img_t.schema.get_field_index("n_detections"), "n_detections", zeros)
    marker = ShardWriter(uri).write_shard(SHARD, "h", output.empty_detections(), img_t, RUN)
    assert marker.files == (f"images/part-{SHARD}.parquet",)
    assert detections_dataset(uri).count_rows() == 0 and images_dataset(uri).count_rows() == 3


# -- rewrite, stale files, orphans ------------------------------------------------------------


def test_rewrite_overwrites_and_deletes_stale_class_files(out):
    uri, so = out
    writer = ShardWriter(uri, so)
    first = writer.write_shard(SHARD, "h1", *tables(), RUN)
    again = writer.write_shard(SHARD, "h1", *tables(), RUN, previous_marker=first)
    assert again.files == first.files
    assert detections_dataset(uri, so).count_rows() == 8  # overwritten, not duplicated

    only_cat = writer.write_shard(SHARD, "h1", *tables((CAT,)), RUN, previous_marker=again)
    assert only_cat.files == (
        f"detections/class_id={CAT}/part-{SHARD}.parquet",
        f"images/part-{SHARD}.parquet",
    )
    got = detections_dataset(uri, so).to_table()
    assert set(got.column("class_id").to_pylist()) == {CAT} and got.num_rows == 4
    fs, root = output.filesystem(uri, so)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/detections/class_id={DOG}/part-{SHARD}.parquet")
    assert scan_markers(uri, so)[SHARD] == only_cat


def test_stale_deletion_never_touches_other_shards_files(tmp_path):
    uri = str(tmp_path / "labels")
    writer = ShardWriter(uri)
    other = "s" + stable_id("other")
    det_t, img_t = tables()
    img_t = img_t.set_column(3, "shard_id", pa.array([other] * 3))
    writer.write_shard(other, "h", det_t, img_t, RUN)
    foreign = (
        f"images/part-{other}.parquet",
        f"detections/class_id={CAT}/part-{other}.parquet",
        "../../outside.txt",
    )
    forged = Marker(SHARD, "h", 0, 0, 0, 0, RUN, foreign, "t")
    (tmp_path / "outside.txt").write_text("keep")
    writer.write_shard(SHARD, "h", *tables(), RUN, previous_marker=forged)
    assert images_dataset(uri).count_rows() == 6
    assert detections_dataset(uri).count_rows() == 16
    assert (tmp_path / "outside.txt").read_text() == "keep"


def test_delete_shard_removes_its_files_then_marker(out):
    uri, so = out
    writer = ShardWriter(uri, so)
    marker = writer.write_shard(SHARD, "h1", *tables(), RUN)
    writer.delete_shard(marker)
    writer.delete_shard(marker)  # idempotent
    assert scan_markers(uri, so) == {}
    assert detections_dataset(uri, so).count_rows() == 0
    assert images_dataset(uri, so).count_rows() == 0


def test_orphan_gives_up_inputs_a_current_shard_owns(out):
    """Trim keeps the rows of inputs no current shard lists (and drops a class file left
    empty), keeps the marker's run and settings; an orphan fully claimed is deleted."""
    uri, so = out
    writer = ShardWriter(uri, so)
    uris = [f"s3://src/img/{i}.jpg" for i in range(3)]
    dets = [det(uris[0], CAT, 0.9), det(uris[0], CAT, 0.8), det(uris[1], DOG, 0.7)]
    imgs = [image(uris[0], n=2), image(uris[1], n=1), image(uris[2], "error")]
    marker = writer.write_shard(
        SHARD, "h", detections_table(dets), images_table(imgs), RUN, settings_hash="fp1"
    )
    ids = [stable_id(u) for u in uris]

    assert trim_orphan(writer, marker, {"not-" + ids[0]}) == "kept"
    assert scan_markers(uri, so)[SHARD] == marker

    assert trim_orphan(writer, marker, {ids[1]}) == "trimmed"
    trimmed = scan_markers(uri, so)[SHARD]
    assert trimmed.members_hash == members_hash([ids[0], ids[2]])
    assert (trimmed.run_id, trimmed.settings_hash) == (RUN, "fp1")
    assert (trimmed.n_inputs, trimmed.n_ok, trimmed.n_error, trimmed.n_detections) == (2, 1, 1, 2)
    assert trimmed.files == (
        f"detections/class_id={CAT}/part-{SHARD}.parquet",
        f"images/part-{SHARD}.parquet",
    )  # the DOG file held only the claimed input's rows
    got = detections_dataset(uri, so).to_table()  # unclaimed ids[0] keeps its labels
    assert set(got.column("image_id").to_pylist()) == {ids[0]} and got.num_rows == 2
    assert sorted(images_dataset(uri, so).to_table().column("image_id").to_pylist()) == sorted(
        [ids[0], ids[2]]
    )

    assert trim_orphan(writer, trimmed, {ids[0], ids[2]}) == "deleted"
    assert scan_markers(uri, so) == {}
    assert images_dataset(uri, so).count_rows() == detections_dataset(uri, so).count_rows() == 0


def test_reconcile_counts_outcomes_and_finishes_a_half_deleted_orphan(tmp_path):
    uri = str(tmp_path / "labels")
    writer = ShardWriter(uri)
    other = "s" + stable_id("other")
    det_t, img_t = tables()
    kept = writer.write_shard(SHARD, "h", det_t, img_t, RUN)
    img_o = img_t.set_column(3, "shard_id", pa.array([other] * 3))
    half = writer.write_shard(other, "h", det_t, img_o, RUN)
    os.remove(tmp_path / "labels" / "images" / f"part-{other}.parquet")  # died mid-delete
    outcomes = reconcile_orphans(uri, {}, {SHARD: kept, other: half}, {"unrelated"})
    assert outcomes == {"kept": 1, "deleted": 1}
    assert set(scan_markers(uri)) == {SHARD}
    assert reconcile_orphans(uri, {}, {}, {"unrelated"}) == {}


# -- commit order and atomicity ---------------------------------------------------------------


def test_marker_is_written_last(out, monkeypatch):
    uri, so = out
    real = output.atomic_write

    def failing(fs, path, data):
        if "/_markers/" in path:
            raise OSError("disk full")
        real(fs, path, data)

    monkeypatch.setattr(output, "atomic_write", failing)
    with pytest.raises(OSError, match="disk full"):
        ShardWriter(uri, so).write_shard(SHARD, "h1", *tables(), RUN)
    assert detections_dataset(uri, so).count_rows() == 8  # data landed ...
    assert images_dataset(uri, so).count_rows() == 3
    assert scan_markers(uri, so) == {}  # ... but the shard is not committed


def test_local_writes_leave_no_temp_files(tmp_path, monkeypatch):
    uri = str(tmp_path / "labels")
    marker = ShardWriter(uri).write_shard(SHARD, "h1", *tables(), RUN)
    write_run_summary(uri, None, RUN, {"n": 1})
    assert files_under(uri) == sorted([*marker.files, f"_markers/{SHARD}.json", f"runs/{RUN}.json"])

    target = os.path.join(uri, "runs", f"{RUN}.json")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(output_io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_run_summary(uri, None, RUN, {"n": 2})
    with open(target) as f:
        assert json.load(f) == {"n": 1}  # old content intact
    assert not [f for f in os.listdir(os.path.dirname(target)) if f.startswith(".")]


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["not-a-uuid", "../../etc", CAT.upper(), "{" + CAT + "}", ""])
def test_non_canonical_class_id_is_refused_before_writing(tmp_path, bad):
    uri = str(tmp_path / "labels")
    det_t, img_t = tables()
    det_t = det_t.set_column(6, "class_id", pa.array([bad] * det_t.num_rows))
    with pytest.raises(ValueError, match="class_id"):
        ShardWriter(uri).write_shard(SHARD, "h", det_t, img_t, RUN)
    assert not os.path.exists(uri)


def _case(name: str) -> tuple[pa.Table, pa.Table]:
    det_t, img_t = tables()
    if name == "duplicate input":
        img_t = pa.concat_tables([img_t, img_t.slice(0, 1)])
    elif name == "detections on error input":
        err = f"s3://src/img/{2}.jpg"
        det_t = pa.concat_tables([det_t, detections_table([det(err, CAT, 0.7)])])
    elif name == "detections on unknown input":
        det_t = pa.concat_tables([det_t, detections_table([det("s3://x/y.jpg", CAT, 0.7)])])
    elif name == "unknown status":
        img_t = img_t.set_column(6, "status", pa.array(["ok", "ok", "weird"]))
    elif name == "foreign run":
        img_t = img_t.set_column(0, "run_id", pa.array(["other"] * 3))
    elif name == "foreign shard":
        img_t = img_t.set_column(3, "shard_id", pa.array(["s0"] * 3))
    elif name == "missing column":
        det_t = det_t.drop_columns(["score"])
    elif name == "extra column":
        img_t = img_t.append_column("oops", pa.array([1, 2, 3]))
    elif name == "bad box":
        box = pa.array([[1.0, 2.0, 3.0]] * det_t.num_rows, pa.list_(pa.float64()))
        det_t = det_t.set_column(10, "box", box)
    elif name == "null required":
        img_t = img_t.set_column(2, "uri", pa.array([None, "a", "b"], pa.string()))
    return det_t, img_t


@pytest.mark.parametrize(
    "name",
    [
        "duplicate input",
        "detections on error input",
        "detections on unknown input",
        "unknown status",
        "foreign run",
        "foreign shard",
        "missing column",
        "extra column",
        "bad box",
        "null required",
    ],
)
def test_invariant_violations_raise_and_write_nothing(tmp_path, name):
    uri = str(tmp_path / "labels")
    with pytest.raises(ValueError):
        ShardWriter(uri).write_shard(SHARD, "h", *_case(name), RUN)
    assert not os.path.exists(uri)


def test_unsafe_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="shard_id"):
        ShardWriter(str(tmp_path)).write_shard("../x", "h", *tables(), RUN)
    with pytest.raises(ValueError, match="run_id"):
        write_run_summary(str(tmp_path), None, "a/b", {})


def test_validation_casts_compatible_types(tmp_path):
    det_t, img_t = tables()
    det_t = det_t.set_column(9, "score", det_t.column("score").cast(pa.float64()))
    box = pa.array(det_t.column("box").to_pylist(), pa.list_(pa.float64()))
    det_t = det_t.set_column(10, "box", box)
    marker = ShardWriter(str(tmp_path)).write_shard(SHARD, "h", det_t, img_t, RUN)
    assert marker.n_detections == 8


def test_row_builders():
    t = detections_table([det("s3://a/b.jpg", CAT, 0.5)])
    assert t.schema == DETECTIONS_SCHEMA
    assert t.column("mask_rle")[0].as_py() == b"abc"  # str counts became bytes
    assert t.column("created_at")[0].as_py().tzinfo is not None
    assert t.column("track_id")[0].as_py() is None
    with pytest.raises(ValueError, match="unknown keys"):
        images_table([{**image("s3://a/b.jpg"), "typo": 1}])
    with pytest.raises(ValueError, match="status"):
        images_table([{k: v for k, v in image("s3://a/b.jpg").items() if k != "status"}])


# -- markers, run summary, clearing ------------------------------------------------------------


def test_scan_markers_ignores_garbage(out):
    uri, so = out
    good = ShardWriter(uri, so).write_shard(SHARD, "h1", *tables(), RUN)
    fs, root = output.filesystem(uri, so)
    bad = {
        "garbage.json": b"\x00not json",
        "s1.json": json.dumps({**good.to_dict(), "shard_id": "s2"}).encode(),  # name mismatch
        "s3.json": json.dumps({**good.to_dict(), "shard_id": "s3", "n_error": True}).encode(),
        "s4.json": b"[1, 2]",
        "readme.txt": b"hello",
    }
    for name, blob in bad.items():
        fs.pipe_file(f"{root}/_markers/{name}", blob)
    assert scan_markers(uri, so) == {SHARD: good}


def test_run_summary_and_clear_output(out):
    uri, so = out
    ShardWriter(uri, so).write_shard(SHARD, "h1", *tables(), RUN)
    where = write_run_summary(uri, so, RUN, {"counts": {"ok": 2}, "config": {"x": 1}})
    assert where == f"{uri}/runs/{RUN}.json"
    fs, root = output.filesystem(uri, so)
    assert json.loads(fs.cat_file(f"{root}/runs/{RUN}.json")) == {
        "config": {"x": 1},
        "counts": {"ok": 2},
    }

    clear_output(uri, so)
    clear_output(uri, so)  # idempotent
    fs.invalidate_cache()
    assert scan_markers(uri, so) == {}
    assert detections_dataset(uri, so).count_rows() == 0
    assert images_dataset(uri, so).count_rows() == 0
    assert not fs.exists(f"{root}/detections") and not fs.exists(f"{root}/_markers")
    assert fs.exists(f"{root}/runs/{RUN}.json")


def test_writer_pickles_without_its_filesystem(out):
    uri, so = out
    writer = ShardWriter(uri, so)
    writer.write_shard(SHARD, "h1", *tables(), RUN)
    clone = pickle.loads(pickle.dumps(writer))
    assert clone.output_uri == uri and clone._fs is None


def test_marker_parsing_is_strict():
    good = Marker(SHARD, "h", 3, 2, 1, 8, RUN, ("images/part-x.parquet",), "2026-01-01T00:00:00")
    assert output_io.marker_from_bytes(good.to_json()) == good
    for broken in (
        {**good.to_dict(), "n_ok": -1},
        {**good.to_dict(), "files": "images/part-x.parquet"},
        {k: v for k, v in good.to_dict().items() if k != "members_hash"},
    ):
        with pytest.raises(ValueError):
            Marker.from_dict(broken)


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path):
    """Only old hidden temp files go: data files, markers and a live write's temp stay."""
    root = tmp_path / "labels"
    det = root / "detections" / f"class_id={CAT}"
    det.mkdir(parents=True)
    (root / "_markers").mkdir()
    keep = [det / "part-s1.parquet", root / "_markers" / "s1.json", det / ".part-s2.parquet.tmp-b"]
    old = [det / ".part-s3.parquet.tmp-a", root / "_markers" / ".s3.json.tmp-c"]
    for path in keep + old:
        path.write_bytes(b"x")
    for path in old + [keep[0]]:
        os.utime(path, (1, 1))  # 1970: long dead
    fs, root_path = output_io.filesystem(str(root))
    assert output_io.remove_stale_temp_files(fs, root_path) == 2
    assert all(p.exists() for p in keep) and not any(p.exists() for p in old)
    assert output_io.remove_stale_temp_files(fs, root_path) == 0
    assert output_io.remove_stale_temp_files(fs, str(tmp_path / "absent")) == 0
