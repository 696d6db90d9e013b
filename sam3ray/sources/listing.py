"""List the inputs of a job as independent parts: prefixes, globs, manifests, inventories.

A lake of 10^9 objects cannot be listed by one process walking one paged
sequence. So listing is two steps: :func:`listing_parts` cuts the job's sources
into parts with a few cheap calls on the driver (a prefix fans out over its
common prefixes; a manifest glob over its files; an S3 Inventory report over
its data files), and :func:`read_part` lists one part. The planner runs the
parts in parallel (Ray tasks on a cluster, in-process for small jobs), so no
process ever holds the whole list. :func:`list_inputs` runs them all here:
small jobs and tests.

Entries are taken as they are: no existence check per entry (a listing call per
entry would cost more than the job; a missing object becomes that input's
error row). A job on object storage may not read local paths or other stores.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sam3ray.core.errors import InputError
from sam3ray.core.shards import InputRef
from sam3ray.core.uri import (
    has_glob,
    has_scheme,
    is_object_store,
    literal_prefix,
    local_path,
    store_family,
)
from sam3ray.sources.inventory import inventory_parts
from sam3ray.storage.location import Location
from sam3ray.storage.retry import retry_transient

if TYPE_CHECKING:
    from sam3ray.config.schema import InputConfig

logger = logging.getLogger(__name__)

#: How many parts a prefix fans out into before each part is listed whole.
FAN_OUT = 64
#: How many directory levels the fan-out descends at most.
FAN_OUT_DEPTH = 3
_WHY_LOCAL = "local paths are not allowed (input.allow_local)"


@dataclass(frozen=True)
class ListingPart:
    """One unit of listing work (picklable; runs anywhere with the job's input options).

    ``kind``: ``find`` (everything below ``uri``), ``files`` (``files`` as listed),
    ``manifest`` (one manifest file), ``inventory`` (one S3 Inventory data file).
    ``pattern`` (a regex over full paths) filters a ``find`` that came from a glob.
    """

    kind: str
    uri: str
    source: str  # what the user wrote, for messages: "input.uris[0] s3://b/p/**"
    pattern: str | None = None
    files: tuple[str, ...] = ()
    explicit: bool = False  # a single named file: taken whatever its suffix
    options: dict[str, Any] = field(default_factory=dict)  # inventory: format, columns


def _fan_out(loc: Location, source: str, pattern: str | None) -> list[ListingPart]:
    """Split the listing below ``loc`` over its sub-folders, breadth first."""
    fs = loc.fs
    fs.invalidate_cache()  # a long-lived driver must see objects added since the last listing
    frontier = [(loc.path, 0)]
    parts: list[ListingPart] = []
    while frontier and len(parts) + len(frontier) < FAN_OUT:
        path, depth = frontier.pop(0)
        if depth >= FAN_OUT_DEPTH:
            parts.append(ListingPart("find", loc.sibling_uri(path), source, pattern))
            continue
        try:
            entries = retry_transient(
                lambda p=path: fs.ls(p, detail=True), f"listing {source} ({path})"
            )
        except FileNotFoundError:
            continue
        files = tuple(loc.sibling_uri(e["name"]) for e in entries if e.get("type") == "file")
        if files:
            parts.append(ListingPart("files", loc.sibling_uri(path), source, pattern, files))
        frontier += [(e["name"].rstrip("/"), depth + 1) for e in entries if e.get("type") != "file"]
    parts += [ListingPart("find", loc.sibling_uri(p), source, pattern) for p, _ in frontier]
    return parts


def _glob_regex(loc: Location) -> str:
    from fsspec.utils import glob_translate

    return glob_translate(loc.path)


def _uri_parts(index: int, uri: str, cfg: InputConfig) -> list[ListingPart]:
    source = f"input.uris[{index}] {uri}"
    if not cfg.local_allowed() and not is_object_store(uri):
        raise InputError(f"input.uris[{index}]: {uri}: {_WHY_LOCAL}")
    loc = cfg.location(uri)
    if has_glob(loc.path):
        base = literal_prefix(uri)
        base = base[: base.rfind("/") + 1] if "/" in base else base
        root = cfg.location(base or ".")
        return _fan_out(root, source, _glob_regex(loc)) if root.isdir() else []
    if loc.isdir():
        return _fan_out(loc, source, None)
    if loc.isfile():
        return [
            ListingPart("files", uri, source, files=(loc.sibling_uri(loc.path),), explicit=True)
        ]
    raise InputError(f"input.uris[{index}]: not found: {uri}")


#: Rows of a Parquet manifest one part reads (its row groups are split between parts).
MANIFEST_PART_ROWS = 1_000_000


def _split_parquet(loc: Location, source: str) -> list[ListingPart]:
    """One part per ~MANIFEST_PART_ROWS rows of a Parquet manifest (whole row groups)."""
    import pyarrow.parquet as pq

    with loc.open("rb") as f:
        meta = pq.ParquetFile(f).metadata
    parts, groups, rows = [], [], 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= MANIFEST_PART_ROWS:
            parts.append(ListingPart("manifest", loc.uri, source, options={"row_groups": groups}))
            groups, rows = [], 0
    if groups or not parts:
        parts.append(ListingPart("manifest", loc.uri, source, options={"row_groups": groups}))
    return parts


def _manifest_parts(cfg: InputConfig) -> list[ListingPart]:
    parts = []
    for i, uri in enumerate(cfg.manifests()):
        loc = cfg.location(uri)
        if has_glob(loc.path):
            found = sorted(retry_transient(lambda loc=loc: loc.fs.glob(loc.path), "manifests"))
            if not found:
                raise InputError(f"input.manifest[{i}]: {uri} matched no files")
            files = [loc.sibling_uri(p) for p in found]
        else:
            files = [uri]
        for file in files:
            if file.lower().endswith((".parquet", ".pq")):
                parts += _split_parquet(cfg.location(file), uri)
            else:
                parts.append(ListingPart("manifest", file, uri))
    return parts


def listing_parts(cfg: InputConfig) -> list[ListingPart]:
    """The job's sources cut into parts that can be listed in parallel (a few calls here)."""
    parts: list[ListingPart] = []
    for i, uri in enumerate(cfg.uris):
        parts += retry_transient(lambda i=i, uri=uri: _uri_parts(i, uri, cfg), f"input.uris[{i}]")
    parts += _manifest_parts(cfg)
    if cfg.inventory:
        parts += [
            ListingPart("inventory", uri, cfg.inventory, options=opts)
            for uri, opts in inventory_parts(cfg.location(cfg.inventory))
        ]
    return parts


# -- one part -----------------------------------------------------------------------------


class _Policy:
    """Which entries a job may read: local paths only if allowed, one object store."""

    def __init__(self, cfg: InputConfig) -> None:
        self.allowed = cfg.local_allowed()
        sources = (*cfg.uris, *cfg.manifests(), *([cfg.inventory] if cfg.inventory else []))
        self.stores = {store_family(u) for u in sources if is_object_store(u)}

    def check(self, source: str, where: str, entry: str) -> str:
        if not is_object_store(entry):
            if not self.allowed:
                raise InputError(f"input.manifest: {source} {where}: {entry}: {_WHY_LOCAL}")
            return local_path(entry)
        if not self.allowed and self.stores and store_family(entry) not in self.stores:
            # Only the job's own object store: wrapper filesystems (zip://, tar://,
            # simplecache://, ...) open local files, and http(s):// reaches any host.
            raise InputError(
                f"input.manifest: {source} {where}: {entry}: other filesystems are not "
                f"allowed in a job on object storage (only "
                f"{', '.join(sorted(s + '://' for s in self.stores))}; see input.allow_local)"
            )
        return entry


def manifest_entries(loc: Location, row_groups: list[int] | None = None) -> list[tuple[str, str]]:
    """(where in the file, URI) of one manifest: ``.parquet``/``.pq`` or ``.csv`` with a
    ``uri`` column, else text (one URI a line; blank lines and ``#`` comments skipped).
    Relative local entries of a local manifest are relative to its folder; an empty
    entry is refused, naming the row."""
    uri, path = loc.uri, loc.path
    suffix = os.path.splitext(path)[1].lower()
    entries: list[tuple[str, object]] = []
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        with loc.open("rb") as f:
            file = pq.ParquetFile(f)
            if "uri" not in file.schema_arrow.names:
                raise InputError(f"{uri}: no 'uri' column (columns: {file.schema_arrow.names})")
            groups = range(file.metadata.num_row_groups) if row_groups is None else row_groups
            first = sum(file.metadata.row_group(g).num_rows for g in range(min(groups, default=0)))
            values = file.read_row_groups(list(groups), columns=["uri"]).column("uri").to_pylist()
        entries = [(f"row {first + i + 1}", v) for i, v in enumerate(values)]
    else:
        with loc.open("rb") as f:
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


def read_manifest(loc: Location) -> list[str]:
    """URIs of one manifest (see :func:`manifest_entries`)."""
    return [value for _, value in manifest_entries(loc)]


def read_part(cfg: InputConfig, part: ListingPart) -> Iterator[str]:
    """The URIs one part lists (suffix-filtered, policy-checked), in no particular order."""
    exts = tuple(cfg.extensions)
    if part.kind == "manifest":
        loc = cfg.location(part.uri)
        policy = _Policy(cfg)
        groups = part.options.get("row_groups")
        entries = retry_transient(
            lambda: manifest_entries(loc, groups), f"reading manifest {part.uri}"
        )
        if not entries and groups is None:
            raise InputError(f"input.manifest: {part.uri} lists no URIs")
        for where, entry in entries:
            yield policy.check(part.uri, where, entry)
        return
    if part.kind == "inventory":
        from sam3ray.sources.inventory import read_inventory_file

        for uri in read_inventory_file(cfg.location(part.uri), part.options):
            if uri.lower().endswith(exts):
                yield uri
        return
    if part.kind == "files":
        names = part.files
    else:  # find: everything below the part's prefix
        loc = cfg.location(part.uri)
        found = retry_transient(
            lambda: loc.fs.find(loc.path, detail=True), f"listing {part.source} ({part.uri})"
        )
        names = tuple(loc.sibling_uri(p) for p, i in found.items() if i.get("type") == "file")
    regex = re.compile(part.pattern) if part.pattern else None
    for name in names:
        if part.explicit:
            yield name
            continue
        if regex is not None and not regex.match(cfg.location(name).path):
            continue
        if name.lower().endswith(exts):
            yield name


def list_inputs(cfg: InputConfig) -> list[InputRef]:
    """All inputs of a job, here, de-duplicated and sorted by URI (small jobs and tests)."""
    uris: set[str] = set()
    for part in listing_parts(cfg):
        uris.update(read_part(cfg, part))
    if not uris:
        raise nothing_listed(cfg)
    logger.info("listed %d inputs", len(uris))
    return [InputRef.of(u) for u in sorted(uris)]


def nothing_listed(cfg: InputConfig) -> InputError:
    """The error of a job whose sources list no input at all."""
    named = {
        "input.uris": cfg.uris,
        "input.manifest": cfg.manifests(),
        "input.inventory": [cfg.inventory] if cfg.inventory else [],
    }
    fields = " / ".join(k for k, v in named.items() if v)
    given = [u for v in named.values() for u in v]
    return InputError(f"{fields} matched no files: {given} (extensions {cfg.extensions})")
