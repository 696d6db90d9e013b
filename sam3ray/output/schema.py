"""Arrow schemas of the output tables, their builders and their validation.

Why a module of its own: the stages build these tables in workers and must
agree with the writer on every column type, without importing the writer.

All Arrow fields are nullable on purpose: files from different writers (and
Ray's schema unification) then never disagree on nullability.  The columns
that must be present are enforced by ``validate_table`` instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

_TS = pa.timestamp("us", tz="UTC")

DETECTIONS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("frame_index", pa.int32()),  # null for still images
        ("timestamp_s", pa.float64()),
        ("track_id", pa.int64()),  # null for still images
        ("class_id", pa.string()),
        ("concept", pa.string()),
        ("query", pa.string()),  # core.types.query_label: 'text:"car" +1 box -1 box', 'visual @30'
        ("score", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),  # x0, y0, x1, y1 in original pixels
        ("mask_rle", pa.binary()),  # COCO compressed RLE counts
        ("mask_size", pa.list_(pa.int32(), 2)),  # h, w
        ("area", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model", pa.string()),  # checkpoint name + sha256 prefix
        ("created_at", _TS),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("shard_id", pa.string()),
        ("frame_start", pa.int32()),  # video shards only
        ("frame_end", pa.int32()),
        ("status", pa.string()),  # ok | error | skipped
        ("error", pa.string()),
        ("error_reason", pa.string()),  # short machine-friendly code
        ("n_detections", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("decode_ms", pa.float32()),
        ("infer_ms", pa.float32()),
        ("created_at", _TS),
    ]
)

STATUSES = ("ok", "error", "skipped")

DETECTIONS_REQUIRED = ("run_id", "image_id", "uri", "class_id", "score", "box", "created_at")
IMAGES_REQUIRED = ("run_id", "image_id", "uri", "shard_id", "status", "n_detections", "created_at")

_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


def utc_now() -> datetime:
    """Timezone-aware now, the only clock the output tables use."""
    return datetime.now(timezone.utc)


def validate_table(
    table: pa.Table | pa.RecordBatch,
    schema: pa.Schema,
    required: Iterable[str] = (),
    what: str = "table",
) -> pa.Table:
    """Return ``table`` cast to ``schema`` (column order included), or raise ValueError.

    Casting (not just comparing) lets producers hand over e.g. float64 scores
    or plain lists for boxes; anything lossy or shapeless fails loudly here,
    naming the column, instead of producing files that readers cannot merge.
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    names = set(table.column_names)
    missing = [n for n in schema.names if n not in names]
    extra = sorted(names - set(schema.names))
    if missing or extra:
        raise ValueError(f"{what}: schema mismatch: missing columns {missing}, unexpected {extra}")
    columns = []
    for field in schema:
        col = table.column(field.name)
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except _CAST_ERRORS as exc:
                raise ValueError(
                    f"{what}.{field.name}: cannot cast {col.type} to {field.type}: {exc}"
                ) from exc
        columns.append(col)
    out = pa.Table.from_arrays(columns, schema=schema)
    for name in required:
        nulls = out.column(name).null_count
        if nulls:
            raise ValueError(f"{what}.{name}: {nulls} null value(s) in a required column")
    return out


def _rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema, what: str) -> pa.Table:
    known = set(schema.names)
    now = utc_now()
    prepared = []
    for i, row in enumerate(rows):
        unknown = set(row) - known
        if unknown:
            raise ValueError(f"{what} row {i}: unknown keys {sorted(unknown)}")
        row = dict(row)
        if row.get("created_at") is None:
            row["created_at"] = now
        for key, value in row.items():
            if hasattr(value, "tolist"):  # numpy arrays and scalars
                row[key] = value.tolist()
        if isinstance(row.get("mask_rle"), str):  # pycocotools may hand back str counts
            row["mask_rle"] = row["mask_rle"].encode("ascii")
        prepared.append(row)
    try:
        table = pa.Table.from_pylist(prepared, schema=schema)
    except _CAST_ERRORS as exc:
        raise ValueError(f"{what}: rows do not fit the schema: {exc}") from exc
    return table


def detections_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a validated detections table from dicts (``created_at`` defaults to now)."""
    table = _rows_to_table(rows, DETECTIONS_SCHEMA, "detections")
    return validate_table(table, DETECTIONS_SCHEMA, DETECTIONS_REQUIRED, "detections")


def images_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a validated images table from dicts (``created_at`` defaults to now)."""
    table = _rows_to_table(rows, IMAGES_SCHEMA, "images")
    return validate_table(table, IMAGES_SCHEMA, IMAGES_REQUIRED, "images")


def empty_detections() -> pa.Table:
    """A zero-row detections table, for inputs that produced nothing."""
    return DETECTIONS_SCHEMA.empty_table()


def empty_images() -> pa.Table:
    """A zero-row images table."""
    return IMAGES_SCHEMA.empty_table()


def check_shard_tables(shard_id: str, run_id: str, det: pa.Table, img: pa.Table) -> None:
    """Enforce the images-table contract on validated tables, before a byte is written.

    Every input appears exactly once (per ``frame_start`` for video shards),
    detections exist only for inputs whose status is ok, and every row carries
    this run and shard: violations are bugs upstream, so they raise.
    """
    for name, table in (("detections", det), ("images", img)):
        bad = set(table.column("run_id").to_pylist()) - {run_id}
        if bad:
            raise ValueError(f"{name}: run_id {sorted(bad)} differs from {run_id!r}")
    image_ids = img.column("image_id").to_pylist()
    statuses = img.column("status").to_pylist()
    bad_status = set(statuses) - set(STATUSES)
    if bad_status:
        raise ValueError(f"images: unknown status {sorted(bad_status)}; expected {STATUSES}")
    bad_shard = set(img.column("shard_id").to_pylist()) - {shard_id}
    if bad_shard:
        raise ValueError(f"images: shard_id {sorted(bad_shard)} differs from {shard_id!r}")
    keys = Counter(zip(image_ids, img.column("frame_start").to_pylist(), strict=True))
    dup = sorted(k[0] for k, n in keys.items() if n > 1)
    if dup:
        raise ValueError(f"images: inputs listed more than once: {dup[:5]}")
    ok = {i for i, s in zip(image_ids, statuses, strict=True) if s == "ok"}
    orphans = sorted(set(det.column("image_id").to_pylist()) - ok)
    if orphans:
        raise ValueError(f"detections for inputs without an ok images row: {orphans[:5]}")
