"""Location: one URI and its storage options; reads, atomic writes, deletes, caching.

Local paths, ``file://`` URIs and S3 (a real moto server over HTTP) take the same
code path. Retries of reads: tests/unit/storage/test_retry.py.
"""

from __future__ import annotations

import errno
import os
import pickle
import time

import pytest

from sam3ray.storage.location import STALE_TMP_S, TMP_INFIX, Location
from sam3ray.storage.retry import RetryPolicy


@pytest.fixture
def s3_tree(moto_s3):
    bucket = moto_s3.new_bucket("location")
    for key in ["imgs/b.jpg", "imgs/a/c.png", "other/e.jpg"]:
        moto_s3.put(bucket, key, key)
    return bucket


def hidden_temp_files(root) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if TMP_INFIX in n]


# -- reading and filesystems -------------------------------------------------------------


def test_read_bytes_local_and_s3(moto_s3, s3_tree, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    assert Location(str(tmp_path / "x.bin")).read_bytes() == b"\x00\x01"
    assert Location(f"file://{tmp_path}/x.bin").read_bytes() == b"\x00\x01"
    opts = moto_s3.storage_options
    assert Location(f"s3://{s3_tree}/imgs/b.jpg", opts).read_bytes() == b"imgs/b.jpg"
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):  # final at once: a retry would wait >= 2.5 s
        Location(f"s3://{s3_tree}/imgs/none.jpg", opts).read_bytes(RetryPolicy(base_delay=5.0))
    assert time.monotonic() - t0 < 2.5
    with pytest.raises(FileNotFoundError):
        Location(str(tmp_path / "none.bin")).read_bytes(RetryPolicy(base_delay=5.0))


def test_filesystem_cache():
    loc1 = Location("s3://b/k.jpg", {"anon": True})
    loc2 = Location("s3://b/other.jpg", {"anon": True})
    loc3 = Location("s3://b/k.jpg", {"anon": False})
    assert loc1.fs is loc2.fs and loc1.fs is not loc3.fs and loc1.path == "b/k.jpg"
    local = Location("file:///tmp/../tmp/x.jpg", {"key": "ignored"})
    assert local.path == "/tmp/x.jpg" and local.fs is Location("/y").fs


def test_filesystem_is_cached_per_options_not_per_uri():
    a = Location("s3://b/x", {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}})
    same = Location("s3a://other/y", {"client_kwargs": {"region_name": "eu-west-1"}, "anon": True})
    other = Location("s3://b/x", {"anon": True, "client_kwargs": {"region_name": "us-east-1"}})
    assert a.fs is a.fs  # built once, then reused
    assert same.protocol == "s3a" and a.protocol == "s3"
    assert Location("s3://c/z", same.options).fs is a.fs  # equal options, any key order
    assert other.fs is not a.fs
    # Options are for the object store: local locations share one filesystem whatever they say.
    assert Location("/a", {"anon": True}).fs is Location("file:///b", {"key": "k"}).fs


def test_gcs_uris_get_a_gcsfs_filesystem():
    """gs:// is a first-class store (gcsfs is a dependency); nothing is contacted here."""
    loc = Location("gs://bucket/imgs/a.jpg", {"token": "anon"})
    assert "gs" in loc.fs.protocol or "gcs" in loc.fs.protocol
    assert loc.path == "bucket/imgs/a.jpg" and not loc.is_local


def test_pickling_carries_the_uri_and_options_not_a_filesystem():
    loc = Location("s3://bucket/out", {"anon": True, "client_kwargs": {"region_name": "x"}})
    fs = loc.fs  # built (and cached) before pickling
    blob = pickle.dumps(loc)
    assert b"s3fs" not in blob and b"fsspec" not in blob and b"S3FileSystem" not in blob
    back = pickle.loads(blob)
    assert back == loc and back.uri == loc.uri and dict(back.options) == dict(loc.options)
    assert "fs" not in vars(back)
    assert back.fs is fs  # the receiving process builds (here: finds) its own


# -- where -----------------------------------------------------------------------------------


def test_child_keeps_options_and_joins_one_slash():
    opts = {"anon": True}
    base = Location("s3://bucket/out/", opts)
    child = base.child("/_markers/s1.json")
    assert child.uri == "s3://bucket/out/_markers/s1.json" and child.options == opts
    assert (
        Location("s3://bucket/out", opts).child("a/b.parquet").uri == "s3://bucket/out/a/b.parquet"
    )
    assert base.child("a").child("b").path == "bucket/out/a/b"
    assert Location("/data/x").child("y.txt") == Location("/data/x/y.txt")


def test_path_local_file_uri_and_relative(tmp_path, monkeypatch):
    assert Location(str(tmp_path) + "/").path == str(tmp_path)
    assert Location(f"file://{tmp_path}/a/../b").path == str(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    assert Location("rel/x.jpg").path == str(tmp_path / "rel" / "x.jpg")
    assert Location("rel/x.jpg").is_local and Location("file:///x").is_local
    assert Location("/").path == "/"


def test_path_and_round_trip_on_s3(moto_s3):
    bucket = moto_s3.new_bucket("paths")
    opts = moto_s3.storage_options
    folder = Location(f"s3://{bucket}/labels/", opts)
    assert folder.path == f"{bucket}/labels" and not folder.is_local
    assert Location(f"s3a://{bucket}/labels/x", opts).path == f"{bucket}/labels/x"
    assert not folder.child("a.txt").exists()
    folder.child("a.txt").write_bytes(b"hello")
    folder.child("sub/b.txt").write_bytes(b"world")
    body = moto_s3.boto3_client().get_object(Bucket=bucket, Key="labels/a.txt")["Body"].read()
    assert body == b"hello"
    assert folder.child("a.txt").exists() and folder.child("a.txt").read_bytes() == b"hello"
    assert sorted(folder.list_names()) == ["a.txt", "sub"]
    assert folder.sibling_uri(f"{bucket}/labels/a.txt") == f"s3://{bucket}/labels/a.txt"


# -- writing ---------------------------------------------------------------------------------


def test_write_bytes_replaces_whole_and_leaves_no_temp_file(tmp_path):
    loc = Location(str(tmp_path / "deep" / "dir" / "f.bin"))
    loc.write_bytes(b"first")  # parent folders are created
    assert (tmp_path / "deep" / "dir" / "f.bin").read_bytes() == b"first"
    loc.write_bytes(b"second, longer")
    assert loc.read_bytes() == b"second, longer"
    assert os.listdir(tmp_path / "deep" / "dir") == ["f.bin"]
    assert hidden_temp_files(tmp_path) == []


@pytest.mark.parametrize("broken", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path, monkeypatch, broken):
    loc = Location(f"file://{tmp_path}/f.bin")
    loc.write_bytes(b"old content")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, broken, fail)
    with pytest.raises(OSError, match="No space left"):
        loc.write_bytes(b"new content that never lands")
    monkeypatch.undo()
    assert (tmp_path / "f.bin").read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_read_many_returns_failures_instead_of_raising(tmp_path, moto_s3):
    (tmp_path / "a.json").write_bytes(b"A")
    (tmp_path / "b.json").write_bytes(b"B")
    local = Location(str(tmp_path))
    got = local.read_many(["a.json", "gone.json", "b.json"])
    assert set(got) == {"a.json", "gone.json", "b.json"}
    assert got["a.json"] == b"A" and got["b.json"] == b"B"
    assert isinstance(got["gone.json"], FileNotFoundError)
    assert local.read_many([]) == {}
    only_missing = local.read_many(["nope.json"])
    assert isinstance(only_missing["nope.json"], FileNotFoundError)

    bucket = moto_s3.new_bucket("many")
    moto_s3.put(bucket, "m/a.json", b"A")
    remote = Location(f"s3://{bucket}/m", moto_s3.storage_options).read_many(["a.json", "x.json"])
    assert remote["a.json"] == b"A" and isinstance(remote["x.json"], FileNotFoundError)


def test_delete_is_idempotent(tmp_path, moto_s3):
    loc = Location(str(tmp_path / "f.txt"))
    loc.write_bytes(b"x")
    loc.delete()
    assert not loc.exists() and not (tmp_path / "f.txt").exists()
    loc.delete()  # already gone: fine (deletes are retried and repeated)
    Location(str(tmp_path / "never" / "was.txt")).delete()

    bucket = moto_s3.new_bucket("delete")
    remote = Location(moto_s3.put(bucket, "k/f.txt", b"x"), moto_s3.storage_options)
    assert remote.exists()
    remote.delete()
    assert not remote.exists()
    remote.delete()


def test_delete_tree(tmp_path, moto_s3):
    (tmp_path / "out" / "a" / "b").mkdir(parents=True)
    (tmp_path / "out" / "a" / "b" / "f.txt").write_text("x")
    (tmp_path / "out" / "g.txt").write_text("y")
    (tmp_path / "keep.txt").write_text("z")
    assert Location(str(tmp_path / "out")).delete_tree() is True
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    assert Location(str(tmp_path / "out")).delete_tree() is False

    bucket = moto_s3.new_bucket("tree")
    for key in ("out/a/1", "out/b/2", "outside/3"):
        moto_s3.put(bucket, key, b"x")
    opts = moto_s3.storage_options
    assert Location(f"s3://{bucket}/out", opts).delete_tree() is True
    keys = moto_s3.boto3_client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [k["Key"] for k in keys] == ["outside/3"]
    assert Location(f"s3://{bucket}/out", opts).delete_tree() is False


def test_remove_stale_temp_files(tmp_path, moto_s3):
    old = time.time() - STALE_TMP_S - 60
    (tmp_path / "detections" / "class_id=x").mkdir(parents=True)
    stale = [
        tmp_path / f".part-s1.parquet{TMP_INFIX}0123456789ab",
        tmp_path / "detections" / "class_id=x" / f".part-s2.parquet{TMP_INFIX}ba9876543210",
    ]
    fresh = tmp_path / f".part-s3.parquet{TMP_INFIX}aaaaaaaaaaaa"  # a live writer's
    kept_old = [tmp_path / "part-s4.parquet", tmp_path / ".hidden", tmp_path / f"x{TMP_INFIX}1"]
    for p in [*stale, fresh, *kept_old]:
        p.write_bytes(b"x")
    for p in [*stale, *kept_old]:
        os.utime(p, (old, old))
    assert Location(str(tmp_path)).remove_stale_temp_files() == 2
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and all(p.exists() for p in kept_old)
    assert Location(str(tmp_path)).remove_stale_temp_files() == 0
    assert Location(f"file://{tmp_path}").remove_stale_temp_files(older_than_s=-1) == 1
    assert not fresh.exists()
    # Object stores write in one PUT: nothing to clean, and nothing is listed.
    remote = Location(f"s3://{moto_s3.new_bucket('tmp')}/out", moto_s3.storage_options)
    assert remote.remove_stale_temp_files() == 0


def test_every_local_spelling_reads_the_same_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"data")
    for uri in (str(tmp_path / "x.bin"), f"file://{tmp_path}/x.bin", f"local://{tmp_path}/x.bin"):
        loc = Location(uri)
        assert loc.is_local and loc.path == str(tmp_path / "x.bin"), uri
        assert loc.read_bytes() == b"data"
