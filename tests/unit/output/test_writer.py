"""The writer on a local directory and on moto S3: layout, readers, commit order, clearing.

Fixtures ``out`` (a ``Location`` per backend) and ``rows`` (one shard's tables) are in
this folder's conftest.py; marker scanning is in test_markers.py, relabelling some
concepts of a committed shard in tests/unit/stages/test_commit_relabel.py.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import sam3ray.storage.location as location_module
from sam3ray.core.ids import stable_id
from sam3ray.output.markers import Marker, scan_markers
from sam3ray.output.readers import detections_dataset, images_dataset
from sam3ray.output.schema import (
    DETECTIONS_SCHEMA,
    IMAGES_SCHEMA,
    detections_table,
    empty_detections,
    images_table,
)
from sam3ray.output.writer import ShardOutput, ShardWriter, clear_output, write_run_summary
from sam3ray.storage.location import Location


def write(
    writer: ShardWriter,
    shard_id: str,
    det: pa.Table,
    img: pa.Table,
    run_id: str,
    previous: Marker | None = None,
) -> Marker:
    """One commit of a shard (replacing ``previous``'s files)."""
    prev = previous.files if previous is not None else ()
    return writer.write(ShardOutput(shard_id, run_id, det, img, previous_files=prev))


def files_under(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


# -- round trip ------------------------------------------------------------------------------


def test_write_shard_round_trip(out, rows):
    CAT, DOG, SHARD = rows.CAT, rows.DOG, rows.SHARD
    det_t, img_t = rows.tables()
    marker = write(ShardWriter(out), SHARD, det_t, img_t, rows.RUN)

    assert marker.files == (
        f"detections/class_id={DOG}/part-{SHARD}.parquet",
        f"detections/class_id={CAT}/part-{SHARD}.parquet",
        f"images/part-{SHARD}.parquet",
    )
    assert (marker.n_inputs, marker.n_ok, marker.n_error, marker.n_detections) == (3, 2, 1, 8)
    assert scan_markers(out) == {SHARD: marker}

    got = detections_dataset(out).to_table()
    assert got.num_rows == 8
    assert got.schema.names == DETECTIONS_SCHEMA.names
    assert got.schema.field("box").type.list_size == 4
    assert sorted(got.column("class_id").to_pylist()) == [DOG] * 4 + [CAT] * 4
    assert got.column("mask_rle").to_pylist()[0] == b"abc"
    assert got.column("created_at").type == pa.timestamp("us", tz="UTC")
    only_cat = detections_dataset(out).to_table(filter=ds.field("class_id") == CAT)
    assert only_cat.num_rows == 4 and set(only_cat.column("concept").to_pylist()) == {"cat"}

    imgs = images_dataset(out).to_table()
    assert imgs.schema == IMAGES_SCHEMA
    assert sorted(imgs.column("status").to_pylist()) == ["error", "ok", "ok"]

    with out.child(f"detections/class_id={CAT}/part-{SHARD}.parquet").open("rb") as f:
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.metadata[b"sam3ray.class_id"] == CAT.encode()
        assert "class_id" not in pf.schema_arrow.names  # lives in the directory name
        assert pf.metadata.row_group(0).column(0).statistics.has_min_max
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        got_rows = pf.read().select(["image_id", "score"]).to_pylist()
    assert got_rows == sorted(got_rows, key=lambda r: (r["image_id"], -r["score"]))

    if not out.is_local:  # generic readers over S3 too
        pdf = pd.read_parquet(f"{out.uri}/detections", storage_options=dict(out.options))
        assert len(pdf) == 8 and set(pdf["class_id"].astype(str)) == {CAT, DOG}
        detections = out.child("detections")
        hive = ds.dataset(
            detections.path, filesystem=detections.arrow_filesystem(), partitioning="hive"
        )
        assert hive.to_table().num_rows == 8


def test_generic_readers_on_local_output(tmp_path, rows):
    CAT, DOG = rows.CAT, rows.DOG
    uri = str(tmp_path / "labels")
    write(ShardWriter(Location(uri)), rows.SHARD, *rows.tables(), rows.RUN)

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
    loc = Location(str(tmp_path / "nothing"))
    assert detections_dataset(loc).to_table().schema == DETECTIONS_SCHEMA
    assert images_dataset(loc).count_rows() == 0
    assert scan_markers(loc) == {}


def test_shard_without_detections_writes_images_and_marker(tmp_path, rows):
    loc = Location(str(tmp_path / "labels"))
    _, img_t = rows.tables()
    zeros = pa.array([0, 0, 0], pa.int32())
    img_t = img_t.set_column(img_t.schema.get_field_index("n_detections"), "n_detections", zeros)
    marker = write(ShardWriter(loc), rows.SHARD, empty_detections(), img_t, rows.RUN)
    assert marker.files == (f"images/part-{rows.SHARD}.parquet",)
    assert detections_dataset(loc).count_rows() == 0 and images_dataset(loc).count_rows() == 3


# -- rewrite, stale files ------------------------------------------------------------------------


def test_rewrite_overwrites_and_deletes_stale_class_files(out, rows):
    CAT, DOG, SHARD, RUN = rows.CAT, rows.DOG, rows.SHARD, rows.RUN
    writer = ShardWriter(out)
    first = write(writer, SHARD, *rows.tables(), RUN)
    again = write(writer, SHARD, *rows.tables(), RUN, previous=first)
    assert again.files == first.files
    assert detections_dataset(out).count_rows() == 8  # overwritten, not duplicated

    only_cat = write(writer, SHARD, *rows.tables((CAT,)), RUN, previous=again)
    assert only_cat.files == (
        f"detections/class_id={CAT}/part-{SHARD}.parquet",
        f"images/part-{SHARD}.parquet",
    )
    got = detections_dataset(out).to_table()
    assert set(got.column("class_id").to_pylist()) == {CAT} and got.num_rows == 4
    out.refresh()
    assert not out.child(f"detections/class_id={DOG}/part-{SHARD}.parquet").exists()
    assert scan_markers(out)[SHARD] == only_cat


def test_stale_deletion_never_touches_other_shards_files(tmp_path, rows):
    CAT, SHARD, RUN = rows.CAT, rows.SHARD, rows.RUN
    loc = Location(str(tmp_path / "labels"))
    writer = ShardWriter(loc)
    other = "s" + stable_id("other")
    det_t, img_t = rows.tables()
    img_t = img_t.set_column(3, "shard_id", pa.array([other] * 3))
    write(writer, other, det_t, img_t, RUN)
    foreign = (
        f"images/part-{other}.parquet",
        f"detections/class_id={CAT}/part-{other}.parquet",
        "../../outside.txt",
    )
    forged = Marker(SHARD, 0, 0, 0, 0, RUN, foreign, "t")
    (tmp_path / "outside.txt").write_text("keep")
    write(writer, SHARD, *rows.tables(), RUN, previous=forged)
    assert images_dataset(loc).count_rows() == 6
    assert detections_dataset(loc).count_rows() == 16
    assert (tmp_path / "outside.txt").read_text() == "keep"


def test_marker_is_written_last(out, rows, monkeypatch):
    real = Location.write_bytes

    def failing(self, data):
        if "/_markers/" in self.uri:
            raise OSError("disk full")
        real(self, data)

    monkeypatch.setattr(Location, "write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        write(ShardWriter(out), rows.SHARD, *rows.tables(), rows.RUN)
    assert detections_dataset(out).count_rows() == 8  # data landed ...
    assert images_dataset(out).count_rows() == 3
    assert scan_markers(out) == {}  # ... but the shard is not committed


def test_local_writes_leave_no_temp_files(tmp_path, rows, monkeypatch):
    SHARD, RUN = rows.SHARD, rows.RUN
    uri = str(tmp_path / "labels")
    loc = Location(uri)
    marker = write(ShardWriter(loc), SHARD, *rows.tables(), RUN)
    write_run_summary(loc, RUN, {"n": 1})
    assert files_under(uri) == sorted([*marker.files, f"_markers/{SHARD}.json", f"runs/{RUN}.json"])

    target = os.path.join(uri, "runs", f"{RUN}.json")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(location_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_run_summary(loc, RUN, {"n": 2})
    with open(target) as f:
        assert json.load(f) == {"n": 1}  # old content intact
    assert not [f for f in os.listdir(os.path.dirname(target)) if f.startswith(".")]


# -- validation --------------------------------------------------------------------------------

_A_UUID = "123e4567-e89b-42d3-a456-426614174000"


@pytest.mark.parametrize(
    "bad", ["not-a-uuid", "../../etc", _A_UUID.upper(), "{" + _A_UUID + "}", ""]
)
def test_non_canonical_class_id_is_refused_before_writing(tmp_path, rows, bad):
    uri = str(tmp_path / "labels")
    det_t, img_t = rows.tables()
    det_t = det_t.set_column(6, "class_id", pa.array([bad] * det_t.num_rows))
    with pytest.raises(ValueError, match="class_id"):
        write(ShardWriter(Location(uri)), rows.SHARD, det_t, img_t, rows.RUN)
    assert not os.path.exists(uri)


def _case(rows, name: str) -> tuple[pa.Table, pa.Table]:
    det_t, img_t = rows.tables()
    if name == "duplicate input":
        img_t = pa.concat_tables([img_t, img_t.slice(0, 1)])
    elif name == "detections on error input":
        err = f"s3://src/img/{2}.jpg"
        det_t = pa.concat_tables([det_t, detections_table([rows.det(err, rows.CAT, 0.7)])])
    elif name == "detections on unknown input":
        unknown = detections_table([rows.det("s3://x/y.jpg", rows.CAT, 0.7)])
        det_t = pa.concat_tables([det_t, unknown])
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
def test_invariant_violations_raise_and_write_nothing(tmp_path, rows, name):
    uri = str(tmp_path / "labels")
    with pytest.raises(ValueError):
        write(ShardWriter(Location(uri)), rows.SHARD, *_case(rows, name), rows.RUN)
    assert not os.path.exists(uri)


def test_unsafe_ids_are_refused(tmp_path, rows):
    with pytest.raises(ValueError, match="shard_id"):
        write(ShardWriter(Location(str(tmp_path))), "../x", *rows.tables(), rows.RUN)
    with pytest.raises(ValueError, match="run_id"):
        write_run_summary(Location(str(tmp_path)), "a/b", {})


def test_validation_casts_compatible_types(tmp_path, rows):
    det_t, img_t = rows.tables()
    det_t = det_t.set_column(9, "score", det_t.column("score").cast(pa.float64()))
    box = pa.array(det_t.column("box").to_pylist(), pa.list_(pa.float64()))
    det_t = det_t.set_column(10, "box", box)
    marker = write(ShardWriter(Location(str(tmp_path))), rows.SHARD, det_t, img_t, rows.RUN)
    assert marker.n_detections == 8


def test_row_builders(rows):
    t = detections_table([rows.det("s3://a/b.jpg", rows.CAT, 0.5)])
    assert t.schema == DETECTIONS_SCHEMA
    assert t.column("mask_rle")[0].as_py() == b"abc"  # str counts became bytes
    assert t.column("created_at")[0].as_py().tzinfo is not None
    assert t.column("track_id")[0].as_py() is None
    with pytest.raises(ValueError, match="unknown keys"):
        images_table([{**rows.image("s3://a/b.jpg"), "typo": 1}])
    with pytest.raises(ValueError, match="status"):
        images_table([{k: v for k, v in rows.image("s3://a/b.jpg").items() if k != "status"}])


# -- run summary, clearing, pickling -----------------------------------------------------------


def test_run_summary_and_clear_output(out, rows):
    RUN = rows.RUN
    write(ShardWriter(out), rows.SHARD, *rows.tables(), RUN)
    where = write_run_summary(out, RUN, {"counts": {"ok": 2}, "config": {"x": 1}})
    assert where == f"{out.uri}/runs/{RUN}.json"
    assert json.loads(out.child(f"runs/{RUN}.json").read_bytes()) == {
        "config": {"x": 1},
        "counts": {"ok": 2},
    }

    clear_output(out)
    clear_output(out)  # idempotent
    out.refresh()
    assert scan_markers(out) == {}
    assert detections_dataset(out).count_rows() == 0
    assert images_dataset(out).count_rows() == 0
    assert not out.child("detections").exists() and not out.child("_markers").exists()
    assert out.child(f"runs/{RUN}.json").exists()


def test_writer_pickles_without_its_filesystem(out, rows):
    writer = ShardWriter(out)
    write(writer, rows.SHARD, *rows.tables(), rows.RUN)
    clone = pickle.loads(pickle.dumps(writer))
    # Only the location travels (uri and options); the filesystem is rebuilt per process.
    assert vars(clone) == {"output": out}
    assert vars(clone.output) == {"uri": out.uri, "options": dict(out.options)}
    marker = write(clone, rows.SHARD, *rows.tables(), rows.RUN)
    assert scan_markers(out)[rows.SHARD] == marker


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path, rows):
    """Only old hidden temp files go: data files, markers and a live write's temp stay."""
    root = tmp_path / "labels"
    det = root / "detections" / f"class_id={rows.CAT}"
    det.mkdir(parents=True)
    (root / "_markers").mkdir()
    keep = [det / "part-s1.parquet", root / "_markers" / "s1.json", det / ".part-s2.parquet.tmp-b"]
    old = [det / ".part-s3.parquet.tmp-a", root / "_markers" / ".s3.json.tmp-c"]
    for path in keep + old:
        path.write_bytes(b"x")
    for path in old + [keep[0]]:
        os.utime(path, (1, 1))  # 1970: long dead
    loc = Location(str(root))
    assert loc.remove_stale_temp_files() == 2
    assert all(p.exists() for p in keep) and not any(p.exists() for p in old)
    assert loc.remove_stale_temp_files() == 0
    assert Location(str(tmp_path / "absent")).remove_stale_temp_files() == 0


# -- commits of some concepts, commit keys, the run's plan -------------------------------------


def test_a_commit_of_some_concepts_keeps_the_others_files(out, rows):
    """A relabel writes only its concepts' rows: the kept concepts' files stay as they are
    and stay listed in the marker, whose detection count is the images rows' sum."""
    CAT, DOG, SHARD, RUN = rows.CAT, rows.DOG, rows.SHARD, rows.RUN
    writer = ShardWriter(out)
    first = writer.write(ShardOutput(SHARD, "run-0", *_retagged(rows, "run-0")))
    dog = f"detections/class_id={DOG}/part-{SHARD}.parquet"
    cat = f"detections/class_id={CAT}/part-{SHARD}.parquet"
    dog_bytes = out.child(dog).read_bytes()
    det, img = rows.tables((CAT,))
    img = img.set_column(  # n_detections over every concept the shard holds: 2 cat + 2 dog
        img.schema.get_field_index("n_detections"), "n_detections", pa.array([4, 4, 0], pa.int32())
    )
    prints = ((CAT, "fp-cat-2"), (DOG, "fp-dog"))
    marker = writer.write(
        ShardOutput(SHARD, RUN, det, img, prints, (cat, f"images/part-{SHARD}.parquet"), (dog,))
    )
    assert set(marker.files) == set(first.files) and dog in marker.files
    assert out.child(dog).read_bytes() == dog_bytes
    assert marker.n_detections == 8 and marker.prints == prints and marker.run_id == RUN
    got = detections_dataset(out).to_table()
    assert Counter(got.column("run_id").to_pylist()) == {RUN: 4, "run-0": 4}


def _retagged(rows, run_id: str) -> tuple[pa.Table, pa.Table]:
    """The shard's tables as another run wrote them."""

    def tag(table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index("run_id")
        return table.set_column(i, "run_id", pa.array([run_id] * table.num_rows))

    det, img = rows.tables()
    return tag(det), tag(img)


def test_the_commit_key_is_written_after_the_marker(out, rows, monkeypatch):
    from sam3ray.output.state import bucket_of, commit_key, committed

    real, order = Location.write_bytes, []

    def recording(self, data):
        order.append(self.uri[len(out.uri) + 1 :])
        real(self, data)

    monkeypatch.setattr(Location, "write_bytes", recording)
    key = commit_key(rows.RUN, rows.SHARD, errors=True)
    writer = ShardWriter(out)
    writer.write(ShardOutput(rows.SHARD, rows.RUN, *rows.tables(), commit_key=key))
    assert order[-2:] == [f"_markers/{rows.SHARD}.json", key]
    assert key.startswith(f"_state/commits/{rows.RUN}/")
    assert committed(out, rows.RUN, bucket_of(rows.SHARD)) == {rows.SHARD: True}


def test_a_rewrite_keeps_the_run_and_fingerprints_of_the_marker(tmp_path, rows):
    loc = Location(str(tmp_path / "labels"))
    writer = ShardWriter(loc)
    prints = ((rows.CAT, "a"), (rows.DOG, "b"))
    marker = writer.write(ShardOutput(rows.SHARD, rows.RUN, *rows.tables(), prints))
    det, img = rows.tables((rows.CAT,))
    again = writer.write(ShardOutput.rewrite(marker, det, img))
    assert (again.run_id, again.prints) == (rows.RUN, prints)
    assert again.files == (
        f"detections/class_id={rows.CAT}/part-{rows.SHARD}.parquet",
        f"images/part-{rows.SHARD}.parquet",
    )
    assert not list((tmp_path / "labels" / f"detections/class_id={rows.DOG}").glob("*.parquet"))
    assert detections_dataset(loc).count_rows() == 4


def test_overwrite_clears_labels_and_state_but_keeps_this_runs_plan(tmp_path, rows):
    from sam3ray.output.state import plan_dir

    root = tmp_path / "labels"
    loc = Location(str(root))
    write(ShardWriter(loc), rows.SHARD, *rows.tables(), rows.RUN)
    for rel in (
        f"{plan_dir('run-old')}/part-00000.parquet",
        f"{plan_dir('run-new')}/part-00000.parquet",
        "_state/index/bucket=001/run-old.parquet",
        "_state/runs/run-old.json",
        "_video/shards/vabc-0000000.parquet",
    ):
        loc.child(rel).write_bytes(b"x")
    write_run_summary(loc, "run-old", {"n": 1})
    clear_output(loc, keep=plan_dir("run-new"))
    assert files_under(str(root)) == sorted(
        ["_state/plans/run-new/part-00000.parquet", "runs/run-old.json"]
    )
