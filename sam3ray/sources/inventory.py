"""S3 Inventory reports as an input: how buckets of billions of objects are listed.

A report is a ``manifest.json`` naming data files (gzipped CSV, Parquet or ORC)
in the destination bucket, one row per object (``Bucket, Key, Size, …``). Reading
those files costs a few GETs per million objects, where a LIST walk costs a
thousand. A job names the manifest, or the folder of an inventory configuration
(``…/source-bucket/config-ID/``), in which case its latest dated report is used,
so a nightly job always sees last night's report.

Rows that are delete markers or not the latest version (versioned reports) are
skipped. CSV keys are URL-encoded by S3 (form encoding: ``+`` for a space) and are
decoded; Parquet and ORC keys are plain.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote_plus

from sam3ray.core.errors import InputError
from sam3ray.storage.location import Location

_DATED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}Z$")
_FORMATS = {"csv": "csv", "parquet": "parquet", "orc": "orc"}


def _snake(name: str) -> str:
    """``IsDeleteMarker`` / ``is_delete_marker`` -> ``is_delete_marker``."""
    name = name.strip()
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def latest_manifest(loc: Location) -> Location:
    """``loc`` if it is a manifest, else the newest ``<date>/manifest.json`` below it."""
    if loc.uri.endswith(".json"):
        return loc
    dated = sorted(n for n in loc.list_names() if _DATED.match(n))
    if not dated:
        raise InputError(f"input.inventory: {loc.uri}: no dated inventory report below it")
    return loc.child(f"{dated[-1]}/manifest.json")


def inventory_parts(loc: Location) -> list[tuple[str, dict[str, Any]]]:
    """(data file URI, reading options) for every data file of the report."""
    manifest_loc = latest_manifest(loc)
    try:
        manifest = json.loads(manifest_loc.read_bytes())
    except FileNotFoundError:
        raise InputError(f"input.inventory: {manifest_loc.uri}: not found") from None
    except ValueError as exc:
        raise InputError(f"input.inventory: {manifest_loc.uri}: not JSON ({exc})") from None
    fmt = _FORMATS.get(str(manifest.get("fileFormat", "")).lower())
    if fmt is None:
        raise InputError(
            f"input.inventory: {manifest_loc.uri}: fileFormat {manifest.get('fileFormat')!r} "
            "(expected CSV, Parquet or ORC)"
        )
    dest = str(manifest.get("destinationBucket", "")).rsplit(":", 1)[-1]
    columns = [_snake(c) for c in str(manifest.get("fileSchema", "")).split(",") if c.strip()]
    if fmt == "csv" and ("bucket" not in columns or "key" not in columns):
        raise InputError(f"input.inventory: {manifest_loc.uri}: fileSchema has no Bucket, Key")
    files = manifest.get("files") or []
    if not dest or not files:
        raise InputError(f"input.inventory: {manifest_loc.uri}: no destinationBucket or files")
    scheme = manifest_loc.uri.split("://", 1)[0] if "://" in manifest_loc.uri else "s3"
    opts = {"format": fmt, "columns": columns}
    return [(f"{scheme}://{dest}/{f['key']}", opts) for f in files]


def _rows(loc: Location, options: dict[str, Any]) -> Any:
    """The data file as a pyarrow table with snake_case columns."""
    import pyarrow as pa

    fmt = options["format"]
    data = loc.read_bytes()
    if fmt == "csv":
        import pyarrow.csv as pacsv

        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        table = pacsv.read_csv(
            io.BytesIO(raw),
            read_options=pacsv.ReadOptions(column_names=options["columns"]),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in options["columns"]}
            ),
        )
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
    else:
        import pyarrow.orc as orc

        table = orc.read_table(io.BytesIO(data))
    return table.rename_columns([_snake(c) for c in table.column_names])


def _true(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def read_inventory_file(loc: Location, options: dict[str, Any]) -> Iterator[str]:
    """``s3://bucket/key`` of every live object one data file lists."""
    table = _rows(loc, options)
    names = set(table.column_names)
    if not {"bucket", "key"} <= names:
        raise InputError(f"{loc.uri}: inventory data file without bucket/key columns")
    decode = options["format"] == "csv"
    cols = {c: table.column(c).to_pylist() for c in ("bucket", "key") if c in names}
    latest = table.column("is_latest").to_pylist() if "is_latest" in names else None
    deleted = table.column("is_delete_marker").to_pylist() if "is_delete_marker" in names else None
    scheme = loc.uri.split("://", 1)[0] if "://" in loc.uri else "s3"
    for i, (bucket, key) in enumerate(zip(cols["bucket"], cols["key"], strict=True)):
        if not key or (latest is not None and not _true(latest[i])):
            continue
        if deleted is not None and _true(deleted[i]):
            continue
        yield f"{scheme}://{bucket}/{unquote_plus(key) if decode else key}"
