"""Storage primitives of the writer: filesystems, atomic writes, the commit marker.

They know no output layout (that is ``sam3ray.output``'s job); they are apart
so the writer stays readable and the driver can handle markers as plain values.
Strict marker parsing is what lets ``scan_markers`` treat any damaged marker as
"not done" instead of trusting half a record.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

_INT_FIELDS = ("n_inputs", "n_ok", "n_error", "n_detections")
#: Infix of ``atomic_write``'s hidden temp files (``.<name>.tmp-<hex>``).
TMP_INFIX = ".tmp-"
#: A temp file lives for the seconds of one write; one this old was left by a killed
#: process (SIGKILL skips the cleanup), never by a live writer.
STALE_TMP_S = 15 * 60
_STR_FIELDS = ("shard_id", "members_hash", "run_id", "written_at")


@dataclass(frozen=True)
class Marker:
    """What ``_markers/<shard_id>.json`` holds; ``files`` are paths relative to the output root."""

    shard_id: str
    members_hash: str
    n_inputs: int
    n_ok: int
    n_error: int
    n_detections: int
    run_id: str
    files: tuple[str, ...]
    written_at: str
    settings_hash: str = ""  # fingerprint.Fingerprinter digest; "" in pre-fingerprint markers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = list(self.files)
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_dict(cls, d: Any) -> Marker:
        """Parse a marker dict, raising ValueError on any missing or mistyped field."""
        if not isinstance(d, dict):
            raise ValueError(f"marker is a {type(d).__name__}, not an object")
        for key in _STR_FIELDS:
            if not isinstance(d.get(key), str):
                raise ValueError(f"marker field {key!r} missing or not a string")
        for key in _INT_FIELDS:
            value = d.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"marker field {key!r} missing or not a count")
        files = d.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("marker field 'files' missing or not a list of strings")
        settings_hash = d.get("settings_hash", "")
        if not isinstance(settings_hash, str):
            raise ValueError("marker field 'settings_hash' is not a string")
        kwargs = {k: d[k] for k in _STR_FIELDS + _INT_FIELDS}
        return cls(files=tuple(files), settings_hash=settings_hash, **kwargs)


def marker_from_bytes(blob: bytes) -> Marker:
    """Parse a marker file's bytes (ValueError on bad JSON or fields)."""
    try:
        data = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"marker is not JSON: {exc}") from exc
    return Marker.from_dict(data)


def filesystem(
    output_uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, root path without protocol or trailing slash) of an output URI."""
    fs, root = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
    return fs, root.rstrip("/") or "/"


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow view of an fsspec filesystem, for ``pyarrow.dataset``."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part.

    Local disks: a hidden temp file in the same directory, fsync, ``os.replace``
    (hidden, so pyarrow.dataset and ``*.parquet`` globs skip it).  Object
    stores: one PUT (or a multipart upload, visible only on completion) of
    bytes already in memory, so a failure while serialising can never commit
    a truncated object.
    """
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}{TMP_INFIX}{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_table(
    fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None
) -> pa.Table:
    """One Parquet file through fsspec (what the writer wrote, read back whole)."""
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def remove_stale_temp_files(
    fs: fsspec.AbstractFileSystem, root: str, older_than_s: float = STALE_TMP_S
) -> int:
    """Delete the hidden temp files a killed writer left under a local output root.

    Readers skip them already; this only gives the disk back. Object stores
    have none (one PUT per file). Returns how many were removed.
    """
    if not isinstance(fs, LocalFileSystem):
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for directory, _, names in os.walk(root):
        for name in names:
            if not (name.startswith(".") and TMP_INFIX in name):
                continue
            path = os.path.join(directory, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.remove(path)
                    removed += 1
            except FileNotFoundError:  # its writer finished or another cleaner won
                continue
    return removed


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a table the way every output file is written (zstd, statistics,
    row groups of ~64 MiB in memory, no dictionary for mask bytes)."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        row_group_size=max(1024, 64 * 1024 * 1024 // bytes_per_row),
        write_statistics=True,
        use_dictionary=[n for n in table.column_names if n != "mask_rle"],
    )
    return sink.getvalue().to_pybytes()
