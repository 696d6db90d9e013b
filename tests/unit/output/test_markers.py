"""Commit markers: strict parsing, and how they are read (``scan_markers``, ``read_marker``).

Planning reads the consolidated state (``output.state``), not markers; a marker
says what a shard's files are now (the video stitch pass and single-shard
readers use it). A marker that cannot be *parsed* is treated as absent (with a
warning); a marker that cannot be *read* is never taken as absent: transient
failures are retried, others raise.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest

import sam3ray.storage.retry as retry_module
from sam3ray.output.markers import Marker, marker_from_bytes, read_marker, scan_markers
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.storage.location import Location


def commit(out: Location, rows, shard_id: str | None = None) -> Marker:
    shard_id = shard_id or rows.SHARD
    det, img = rows.tables()
    if shard_id != rows.SHARD:
        img = img.set_column(3, "shard_id", pa.array([shard_id] * img.num_rows))
    prints = tuple(sorted({rows.CAT: "fp-cat", rows.DOG: "fp-dog"}.items()))  # as tasks hold them
    return ShardWriter(out).write(ShardOutput(shard_id, rows.RUN, det, img, prints))


@pytest.fixture()
def local(tmp_path) -> Location:
    return Location(str(tmp_path / "labels"))


@pytest.fixture()
def sleeps(monkeypatch) -> list[float]:
    """Retries back off without waiting; the delays they asked for are recorded."""
    asked: list[float] = []
    monkeypatch.setattr(retry_module.time, "sleep", asked.append)
    return asked


def fail_reads(monkeypatch, errors: list[BaseException]) -> list[list[str]]:
    """Make ``Location.read_many`` hand back the next of ``errors`` for every file it is
    asked for, while any remain; then read for real. Returns the names of every call."""
    real = Location.read_many
    calls: list[list[str]] = []

    def read_many(self, relpaths):
        calls.append(list(relpaths))
        if errors:
            exc = errors.pop(0)
            return {r: exc for r in relpaths}
        return real(self, relpaths)

    monkeypatch.setattr(Location, "read_many", read_many)
    return calls


# -- parsing ------------------------------------------------------------------------------------


def test_marker_parsing_is_strict(rows):
    prints = ((rows.CAT, "fp-cat"),)
    good = Marker(
        rows.SHARD, 3, 2, 1, 8, rows.RUN, ("images/part-x.parquet",), "2026-01-01", prints
    )
    assert marker_from_bytes(good.to_json()) == good
    assert json.loads(good.to_json())["prints"] == {rows.CAT: "fp-cat"}
    for broken in (
        {**good.to_dict(), "n_ok": -1},
        {**good.to_dict(), "n_error": True},
        {**good.to_dict(), "files": "images/part-x.parquet"},
        {**good.to_dict(), "prints": [["a", "b"]]},
        {**good.to_dict(), "prints": {rows.CAT: 3}},
        {k: v for k, v in good.to_dict().items() if k != "run_id"},
    ):
        with pytest.raises(ValueError):
            Marker.from_dict(broken)


def test_markers_without_prints_and_old_markers_still_parse(rows):
    """A marker written before per-concept fingerprints (members/settings hashes) parses,
    with no fingerprints: what it vouches for is in the state, not here."""
    good = Marker(rows.SHARD, 3, 2, 1, 8, rows.RUN, ("images/part-x.parquet",), "t")
    legacy = {**good.to_dict(), "members_hash": "h", "settings_hash": "fp"}
    del legacy["prints"]
    assert marker_from_bytes(json.dumps(legacy).encode()) == good
    assert good.prints == ()


def test_scan_markers_ignores_garbage(out, rows):
    good = commit(out, rows)
    bad = {
        "garbage.json": b"\x00not json",
        "s1.json": json.dumps({**good.to_dict(), "shard_id": "s2"}).encode(),  # name mismatch
        "s3.json": json.dumps({**good.to_dict(), "shard_id": "s3", "n_error": True}).encode(),
        "s4.json": b"[1, 2]",
        "readme.txt": b"hello",
    }
    for name, blob in bad.items():
        out.child(f"_markers/{name}").write_bytes(blob)
    assert scan_markers(out) == {rows.SHARD: good}


def test_a_corrupt_marker_is_skipped_with_a_warning(local, rows, caplog):
    good = commit(local, rows)
    local.child("_markers/s9.json").write_bytes(b'{"shard_id": "s9"')  # cut off mid-write
    with caplog.at_level(logging.WARNING, logger="sam3ray.output.markers"):
        assert scan_markers(local) == {rows.SHARD: good}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "s9.json" in warned[0] and "not JSON" in warned[0]


def test_hidden_temp_files_are_neither_read_nor_warned_about(local, rows, caplog, monkeypatch):
    good = commit(local, rows)
    # A writer killed mid-write leaves a hidden temp file: whole JSON, or a part of one.
    local.child(f"_markers/.{rows.SHARD}.json.tmp-0123abcd").write_bytes(good.to_json())
    local.child("_markers/.s7.json.tmp-4567ef01").write_bytes(b'{"shard_')
    local.child("_markers/.s8.json").write_bytes(b"not even json")
    calls = fail_reads(monkeypatch, [])
    with caplog.at_level(logging.WARNING, logger="sam3ray.output.markers"):
        assert scan_markers(local) == {rows.SHARD: good}
    assert calls == [[f"{rows.SHARD}.json"]]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- read failures: retried or raised, never "not done" -------------------------------------------


def test_a_transient_read_failure_is_retried(local, rows, monkeypatch, sleeps):
    good = commit(local, rows)
    calls = fail_reads(monkeypatch, [ConnectionResetError("connection reset by peer")])
    assert scan_markers(local) == {rows.SHARD: good}
    assert len(calls) == 2 and len(sleeps) == 1


def test_a_throttled_read_through_the_filesystem_is_retried(local, rows, monkeypatch, sleeps):
    """The error comes back from fsspec's batched ``cat(on_error="return")``, as on S3."""
    good = commit(local, rows)
    fs = local.fs
    real = fs.cat
    failures = [TimeoutError("read timed out")]

    def cat(paths, *args, **kwargs):
        if failures:
            exc = failures.pop()
            return {p: exc for p in paths}
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(fs, "cat", cat)
    assert scan_markers(local) == {rows.SHARD: good}
    assert not failures and len(sleeps) == 1


def test_a_transient_failure_that_persists_raises_after_the_retries(
    local, rows, monkeypatch, sleeps
):
    commit(local, rows)
    calls = fail_reads(monkeypatch, [ConnectionResetError("reset")] * 100)
    with pytest.raises(ConnectionResetError):
        scan_markers(local)
    assert len(calls) == retry_module.READS.retries + 1 == len(sleeps) + 1


@pytest.mark.parametrize(
    "error",
    [PermissionError("Access Denied"), RuntimeError("checksum mismatch")],
    ids=["forbidden", "unexpected"],
)
def test_a_non_transient_read_failure_raises_at_once(local, rows, monkeypatch, sleeps, error):
    commit(local, rows)
    calls = fail_reads(monkeypatch, [error])
    with pytest.raises(Exception, match=f"cannot read marker .*{rows.SHARD}.json") as info:
        scan_markers(local)
    assert info.value.__cause__ is error
    assert len(calls) == 1 and sleeps == []


def test_a_transient_listing_failure_is_retried(local, rows, monkeypatch, sleeps):
    good = commit(local, rows)
    real = Location.list_names
    failures = [ConnectionError("listing dropped")]

    def list_names(self):
        if failures:
            raise failures.pop()
        return real(self)

    monkeypatch.setattr(Location, "list_names", list_names)
    assert scan_markers(local) == {rows.SHARD: good}
    assert not failures and len(sleeps) == 1


def test_a_marker_deleted_between_listing_and_read_is_absent(local, rows, monkeypatch):
    good = commit(local, rows)
    other = commit(local, rows, "s" + "1" * 16)
    real = Location.read_many

    def read_many(self, relpaths):
        self.child(f"{other.shard_id}.json").delete()  # an orphan trim won the race
        return real(self, relpaths)

    monkeypatch.setattr(Location, "read_many", read_many)
    assert scan_markers(local) == {rows.SHARD: good}


def test_read_marker(local, rows):
    assert read_marker(local, rows.SHARD) is None
    good = commit(local, rows)
    assert read_marker(local, rows.SHARD) == good
