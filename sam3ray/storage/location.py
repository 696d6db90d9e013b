"""``Location``: a URI and its storage options as one value, and everything done with it.

Before this, ``(uri, storage_options)`` pairs were threaded through thirty
functions and three factories built filesystems from them. A ``Location`` is
small and picklable (the filesystem is not part of it: it is built once per
process and per options, then reused, because an S3 client per file costs a
credential lookup and a connection pool), so it travels into Ray workers as is.

Local paths ignore the options (they are meant for the object store); one code
path serves local disks, S3 and S3-compatible stores (``endpoint_url``), GCS
and Azure through fsspec.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sam3ray.core.errors import StorageError
from sam3ray.core.uri import LOCAL_SCHEMES, local_path, rejoin, scheme
from sam3ray.storage.retry import READS, WRITES, RetryPolicy, retry_transient

#: Infix of ``write_atomic``'s hidden temp files (``.<name>.tmp-<hex>``).
TMP_INFIX = ".tmp-"
#: A temp file lives for the seconds of one write; one this old was left by a killed
#: process (SIGKILL skips the cleanup), never by a live writer.
STALE_TMP_S = 15 * 60

_FS_CACHE: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}
_FS_LOCK = threading.Lock()


def _freeze(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple, set)):
        return tuple(_freeze(v) for v in obj)
    try:
        hash(obj)
    except TypeError:
        return repr(obj)
    return obj


def _filesystem(protocol: str, options: Mapping[str, Any]) -> fsspec.AbstractFileSystem:
    key = (os.getpid(), protocol, _freeze(options))
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            try:
                fs = fsspec.filesystem(protocol, **options)
            except (ImportError, ValueError) as exc:
                raise StorageError(f"no filesystem for {protocol}:// ({exc})") from exc
            _FS_CACHE[key] = fs
    return fs


@dataclass(frozen=True)
class Location:
    """A file or folder: ``uri`` (path, ``file://``, ``s3://``, ``gs://``, …) plus options."""

    uri: str
    options: Mapping[str, Any] = field(default_factory=dict)

    # -- where ----------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        s = scheme(self.uri)
        return "file" if s is None or s in LOCAL_SCHEMES else s

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The process's filesystem for this protocol and these options (cached)."""
        return _filesystem(self.protocol, {} if self.is_local else dict(self.options))

    @property
    def path(self) -> str:
        """The path inside :attr:`fs` (no protocol, no trailing slash)."""
        if self.is_local:
            return local_path(self.uri).rstrip("/") or "/"
        return self.fs._strip_protocol(self.uri).rstrip("/") or "/"

    def child(self, relpath: str) -> Location:
        """The location ``relpath`` below this one (same options)."""
        return Location(f"{self.uri.rstrip('/')}/{relpath.lstrip('/')}", self.options)

    def sibling_uri(self, fs_path: str) -> str:
        """A path this filesystem listed, as a URI with the scheme the user wrote."""
        return rejoin(self.uri, fs_path)

    def with_uri(self, uri: str) -> Location:
        """Another URI read with the same options (e.g. the files a manifest names)."""
        return Location(uri, self.options)

    # -- reading ---------------------------------------------------------------------------
    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self, policy: RetryPolicy = READS) -> bytes:
        """The whole object, retrying transient errors (404 and 403 raise at once)."""
        fs, path = self.fs, self.path
        return retry_transient(lambda: fs.cat_file(path), f"read {self.uri}", policy)

    def exists(self) -> bool:
        fs, path = self.fs, self.path
        return retry_transient(lambda: fs.exists(path), f"stat {self.uri}", READS)

    def isdir(self) -> bool:
        return self.fs.isdir(self.path)

    def isfile(self) -> bool:
        return self.fs.isfile(self.path)

    def refresh(self) -> None:
        """Forget cached listings below here: other processes wrote since the last one."""
        self.fs.invalidate_cache(self.path)

    def list_names(self) -> list[str]:
        """Names directly below this folder (fresh listing); [] if it does not exist."""
        self.refresh()
        fs, path = self.fs, self.path

        def ls() -> list[str]:
            try:
                return fs.ls(path, detail=False)
            except FileNotFoundError:
                return []

        entries = retry_transient(ls, f"list {self.uri}", READS)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in entries]

    def read_many(self, relpaths: list[str]) -> dict[str, bytes | BaseException]:
        """Several files below here in one batched call; failures are returned, not raised."""
        if not relpaths:
            return {}
        paths = {f"{self.path.rstrip('/')}/{r}": r for r in relpaths}
        blobs = self.fs.cat(list(paths), on_error="return")
        out: dict[str, bytes | BaseException] = {
            paths[p]: blob for p, blob in blobs.items() if p in paths
        }
        for rel in relpaths:  # a file the filesystem did not answer for is not "absent"
            out.setdefault(rel, OSError(f"no answer for {self.uri}/{rel}"))
        return out

    # -- writing ---------------------------------------------------------------------------
    def write_bytes(self, data: bytes, policy: RetryPolicy = WRITES) -> None:
        """Write so that readers see the old file or the whole new one, never a part
        (retried: a whole-object write is idempotent).

        Local disks: a hidden temp file in the same directory, fsync, ``os.replace``
        (hidden, so pyarrow.dataset and ``*.parquet`` globs skip it). Object stores:
        one PUT (or a multipart upload, visible only on completion) of bytes already
        in memory, so a failure while serialising never commits a truncated object.
        """
        if not self.is_local:
            fs, path = self.fs, self.path
            retry_transient(lambda: fs.pipe_file(path, data), f"write {self.uri}", policy)
            return
        path = self.path
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

    def delete(self) -> None:
        """Remove this file; a missing file is fine (deletes are retried and repeated)."""
        fs, path = self.fs, self.path

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)

        retry_transient(rm, f"delete {self.uri}", WRITES)

    def delete_tree(self) -> bool:
        """Remove this folder and everything below it; whether there was one."""
        self.refresh()
        if not self.fs.exists(self.path):
            return False
        self.fs.rm(self.path, recursive=True)
        return True

    def remove_stale_temp_files(self, older_than_s: float = STALE_TMP_S) -> int:
        """Delete hidden temp files a killed writer left below this local folder.

        Readers skip them already; this only gives the disk back. Object stores have
        none (one PUT per file). Returns how many were removed.
        """
        if not self.is_local:
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for directory, _, names in os.walk(self.path):
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

    # -- views for other libraries ---------------------------------------------------------
    def arrow_filesystem(self) -> Any:
        """The pyarrow view of :attr:`fs`, for ``pyarrow.dataset`` and Ray Data readers."""
        import pyarrow.fs as pafs

        fs = self.fs
        if isinstance(fs, LocalFileSystem):
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs))

    def __str__(self) -> str:
        return self.uri
