"""List the inputs of a job: globs, prefixes, folders and manifests, on any store.

Listing runs once on the driver and returns a sorted, de-duplicated list, so
that shard boundaries (and therefore output file names) are the same on every
run. Entries of a manifest are taken as they are (no existence check): a
missing object becomes that input's error row, not a failed job.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sam3ray.core.errors import InputError
from sam3ray.core.shards import InputRef
from sam3ray.core.uri import has_glob, has_scheme, is_object_store, local_path, store_family
from sam3ray.storage.location import Location
from sam3ray.storage.retry import retry_transient

if TYPE_CHECKING:
    from sam3ray.config.schema import InputConfig

logger = logging.getLogger(__name__)


def _expand_uri(index: int, loc: Location, exts: tuple[str, ...]) -> list[str]:
    uri, fs, path = loc.uri, loc.fs, loc.path
    fs.invalidate_cache()  # a long-lived driver must see objects added since the last listing

    def files(infos: Mapping[str, Mapping[str, Any]]) -> list[str]:
        return [p for p, i in infos.items() if i.get("type") == "file" and p.lower().endswith(exts)]

    if has_glob(path):
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
    return [loc.sibling_uri(p) for p in found]


def read_manifest(loc: Location) -> list[str]:
    """URIs from a manifest: ``.parquet``/``.pq`` or ``.csv`` with a ``uri`` column, else text.

    Text manifests take one URI per line (blank lines and ``#`` comments skipped).
    Relative local entries of a local manifest are relative to the manifest's folder.
    Entries are taken as they are: no glob expansion and no existence check (a
    listing call per entry would cost more than the job; a missing object becomes
    that input's error row).
    """
    return [value for _, value in _manifest_entries(loc)]


def _manifest_entries(loc: Location) -> list[tuple[str, str]]:
    """(where in the file, URI) for each manifest entry; an empty entry is refused."""
    uri, fs, path = loc.uri, loc.fs, loc.path
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
    allowed = cfg.local_allowed()
    why = "local paths are not allowed (input.allow_local)"
    uris: set[str] = set()
    for i, uri in enumerate(cfg.uris):
        if not allowed and not is_object_store(uri):
            raise InputError(f"input.uris[{i}]: {uri}: {why}")
        uris.update(
            retry_transient(  # a throttled listing must not fail the job before it starts
                lambda i=i, uri=uri: _expand_uri(i, cfg.location(uri), tuple(cfg.extensions)),
                f"listing input.uris[{i}] {uri}",
            )
        )
    if cfg.uris and not uris:
        raise InputError(f"input.uris matched no files: {cfg.uris} (extensions {cfg.extensions})")
    if cfg.manifest:
        manifest = cfg.manifest
        entries = retry_transient(
            lambda: _manifest_entries(cfg.location(manifest)), f"reading input.manifest {manifest}"
        )
        if not entries:
            raise InputError(f"input.manifest: {cfg.manifest} lists no URIs")
        stores = {store_family(u) for u in (*cfg.uris, manifest) if is_object_store(u)}
        for where, entry in entries:
            if not is_object_store(entry):
                if not allowed:
                    raise InputError(f"input.manifest: {cfg.manifest} {where}: {entry}: {why}")
                entry = local_path(entry)
            elif not allowed and stores and store_family(entry) not in stores:
                # Only the job's own object store: wrapper filesystems (zip://, tar://,
                # simplecache://, ...) open local files, and http(s):// reaches any host.
                raise InputError(
                    f"input.manifest: {cfg.manifest} {where}: {entry}: other filesystems are "
                    f"not allowed in a job on object storage (only "
                    f"{', '.join(sorted(s + '://' for s in stores))}; see input.allow_local)"
                )
            uris.add(entry)
    logger.info("listed %d inputs", len(uris))
    return [InputRef.of(u) for u in sorted(uris)]
