"""List the inputs of a job and read their bytes, locally or from an object store.

Everything goes through fsspec so that one code path serves local disks, S3
(and S3-compatible stores through ``endpoint_url``), GCS and Azure. Listing is
done once on the driver and returns a sorted, de-duplicated list so that shard
boundaries (and therefore output file names) are the same on every run.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec

from sam3ray.types import stable_id

if TYPE_CHECKING:
    from sam3ray.config import InputConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")
_LOCAL_SCHEMES = {"file", "local"}
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}
_FS_CACHE: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}
_FS_LOCK = threading.Lock()
_TRANSIENT_CODES = {
    "slowdown", "throttling", "throttlingexception", "throttledexception", "requestthrottled",
    "requestlimitexceeded", "toomanyrequestsexception", "requesttimeout",
    "requesttimeoutexception", "internalerror", "serviceunavailable", "503", "500", "502",
    "504", "429",
}  # fmt: skip
_TRANSIENT_NAMES = ("connection", "timeout", "throttl", "slowdown", "disconnected",
                    "incompleteread", "responsestreaming", "clientpayload")  # fmt: skip


_FINAL_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
    errno.EISDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.ENOENT,
}  # fmt: skip


class InputError(ValueError):
    """The inputs cannot be listed as configured (nothing matched, refused path, bad manifest)."""


@dataclass(frozen=True)
class InputRef:
    """One input: its URI (as read) and its stable id (sha1 prefix of the URI)."""

    uri: str
    image_id: str


def image_id_for(uri: str) -> str:
    """The image id used in every output table: stable across runs and machines."""
    return stable_id(uri)


def has_scheme(uri: str) -> bool:
    return bool(_SCHEME.match(uri))


def is_object_store(uri: str) -> bool:
    """True for any URI with a non-local scheme (s3://, gs://, https://, …)."""
    m = _SCHEME.match(uri)
    return bool(m) and m.group(1).lower() not in _LOCAL_SCHEMES


def _store_family(uri: str) -> str:
    """The scheme of an object-store URI with aliases folded (s3a/s3n -> s3, gcs -> gs)."""
    m = _SCHEME.match(uri)
    scheme = m.group(1).lower() if m else "file"
    return _SCHEME_ALIASES.get(scheme, scheme)


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


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def filesystem_for(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (cached) filesystem for ``uri`` and the path within it.

    Instances are cached per (process, protocol, options): creating an S3 client per
    file costs a credential lookup and a connection pool. Local paths ignore options
    (those are meant for the object store).
    """
    m = _SCHEME.match(uri)
    protocol = m.group(1).lower() if m else "file"
    if protocol in _LOCAL_SCHEMES:
        protocol, opts = "file", {}
    else:
        opts = dict(storage_options or {})
    key = (os.getpid(), protocol, _freeze(opts))
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            try:
                fs = fsspec.filesystem(protocol, **opts)
            except (ImportError, ValueError) as exc:
                raise InputError(f"no filesystem for {protocol}:// ({exc})") from exc
            _FS_CACHE[key] = fs
    path = _local_path(uri) if protocol == "file" else fs._strip_protocol(uri)
    return fs, path


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), status


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: throttling, 5xx, dropped connections, timeouts.

    Missing objects and denied access are final; retrying them only delays the
    error row and multiplies request costs.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return False
        code, status = _error_code(err)
        if code is not None or status is not None:
            return (code or "").lower() in _TRANSIENT_CODES or (status or 0) >= 500 or status == 429
    for err in chain:
        if isinstance(err, OSError) and err.errno in _FINAL_ERRNOS:
            return False  # a full or read-only disk does not heal in a minute of retries
        name = type(err).__name__.lower()
        if isinstance(err, (OSError, ConnectionError, TimeoutError)) or any(
            n in name for n in _TRANSIENT_NAMES
        ):
            return True
    return False


def retry_transient(
    fn: Callable[[], T],
    what: str,
    retries: int = 5,
    *,
    base_delay: float = 0.2,
    max_delay: float = 10.0,
) -> T:
    """Call ``fn()``, retrying it up to ``retries`` times while it fails transiently.

    The one retry policy of the job (reads, listings, writes, markers): final errors
    (missing, forbidden, bad data) raise at once; throttling, 5xx and dropped
    connections are retried with exponential backoff and jitter, so that thousands
    of tasks throttled at once do not come back in lock-step. This sits above
    the clients' own retries (botocore, s3fs), which give up after seconds of
    sustained throttling; ``fn`` must be idempotent.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= retries or not is_transient(exc):
                raise
            cap = min(max_delay, base_delay * 2**attempt)
            delay = cap / 2 + random.uniform(0, cap / 2)
            logger.warning("%s failed (%r); retry %d in %.2fs", what, exc, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def read_bytes(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 5,
    *,
    base_delay: float = 0.2,
    max_delay: float = 10.0,
) -> bytes:
    """Read a whole object, retrying transient errors ``retries`` times (see retry_transient)."""
    fs, path = filesystem_for(uri, storage_options)
    return retry_transient(
        lambda: fs.cat_file(path),
        f"read {uri}",
        retries,
        base_delay=base_delay,
        max_delay=max_delay,
    )


def _rejoin(uri: str, path: str) -> str:
    """A listed path back to a full URI with the scheme the user wrote."""
    m = _SCHEME.match(uri)
    if not m or m.group(1).lower() in _LOCAL_SCHEMES:
        return path
    return f"{m.group(1)}://{path.lstrip('/')}"


def _expand_uri(index: int, uri: str, opts: Mapping[str, Any], exts: tuple[str, ...]) -> list[str]:
    fs, path = filesystem_for(uri, opts)
    fs.invalidate_cache()  # a long-lived driver must see objects added since the last listing

    def files(infos: Mapping[str, Mapping[str, Any]]) -> list[str]:
        return [p for p, i in infos.items() if i.get("type") == "file" and p.lower().endswith(exts)]

    if _GLOB_CHARS.search(path):
        found = files(fs.glob(path, detail=True))
        if not found:
            logger.warning("input.uris[%d] %s matched no files with %s", index, uri, exts)
    elif fs.isdir(path):
        found = files(fs.find(path, detail=True))
        if not found:
            logger.warning("input.uris[%d] %s holds no files with %s", index, uri, exts)
    elif fs.isfile(path):
        found = [path]
    else:
        raise InputError(f"input.uris[{index}]: not found: {uri}")
    return [_rejoin(uri, p) for p in found]


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URIs from a manifest: ``.parquet``/``.pq`` or ``.csv`` with a ``uri`` column, else text.

    Text manifests take one URI per line (blank lines and ``#`` comments skipped).
    Relative local entries of a local manifest are relative to the manifest's folder.
    Entries are taken as they are: no glob expansion and no existence check (a
    listing call per entry would cost more than the job; a missing object becomes
    that input's error row).
    """
    return [value for _, value in _manifest_entries(uri, storage_options)]


def _manifest_entries(uri: str, storage_options: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(where in the file, URI) for each manifest entry; an empty entry is refused."""
    fs, path = filesystem_for(uri, storage_options)
    suffix = os.path.splitext(path)[1].lower()
    entries: list[tuple[str, object]] = []
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if "uri" not in table.column_names:
            raise InputError(f"{uri}: no 'uri' column (columns: {table.column_names})")
        values = table.column("uri").to_pylist()
        entries = [(f"row {i + 1}", v) for i, v in enumerate(values)]
    else:
        with fs.open(path, "rb") as f:
            text = io.TextIOWrapper(f, encoding="utf-8-sig").read()
        if suffix == ".csv":
            reader = csv.DictReader(io.StringIO(text))
            if "uri" not in [c.strip() for c in reader.fieldnames or []]:
                raise InputError(f"{uri}: no 'uri' column (columns: {reader.fieldnames})")
            for row in reader:
                cell = {k.strip(): v for k, v in row.items() if k}.get("uri")
                entries.append((f"row {reader.line_num}", cell))
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    entries.append((f"line {n}", line))
    base = os.path.dirname(path) if not is_object_store(uri) else None
    out = []
    for where, value in entries:
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{uri} {where}: uri is empty")
        value = value.strip()
        if not has_scheme(value) and base is not None:
            value = os.path.join(base, os.path.expanduser(value))
        out.append((where, value))
    return out


def list_inputs(cfg: InputConfig) -> list[InputRef]:
    """All inputs of a job, de-duplicated and sorted by URI (deterministic shards)."""
    opts = cfg.storage_options
    allowed = cfg.local_allowed()
    why = "local paths are not allowed (input.allow_local)"
    uris: set[str] = set()
    for i, uri in enumerate(cfg.uris):
        if not allowed and not is_object_store(uri):
            raise InputError(f"input.uris[{i}]: {uri}: {why}")
        uris.update(
            retry_transient(  # a throttled listing must not fail the job before it starts
                lambda i=i, uri=uri: _expand_uri(i, uri, opts, tuple(cfg.extensions)),
                f"listing input.uris[{i}] {uri}",
            )
        )
    if cfg.uris and not uris:
        raise InputError(f"input.uris matched no files: {cfg.uris} (extensions {cfg.extensions})")
    if cfg.manifest:
        manifest = cfg.manifest
        entries = retry_transient(
            lambda: _manifest_entries(manifest, opts), f"reading input.manifest {manifest}"
        )
        if not entries:
            raise InputError(f"input.manifest: {cfg.manifest} lists no URIs")
        stores = {_store_family(u) for u in (*cfg.uris, manifest) if is_object_store(u)}
        for where, entry in entries:
            if not is_object_store(entry):
                if not allowed:
                    raise InputError(f"input.manifest: {cfg.manifest} {where}: {entry}: {why}")
                entry = _local_path(entry)
            elif not allowed and stores and _store_family(entry) not in stores:
                # Only the job's own object store: wrapper filesystems (zip://, tar://,
                # simplecache://, ...) open local files, and http(s):// reaches any host.
                raise InputError(
                    f"input.manifest: {cfg.manifest} {where}: {entry}: other filesystems are "
                    f"not allowed in a job on object storage (only "
                    f"{', '.join(sorted(s + '://' for s in stores))}; see input.allow_local)"
                )
            uris.add(entry)
    logger.info("listed %d inputs", len(uris))
    return [InputRef(u, image_id_for(u)) for u in sorted(uris)]
