"""Per-concept and per-run statistics of an output, computed by streaming scans.

Why DuckDB over file-by-file streams: the numbers (distinct images per
concept, exact score percentiles) need hash tables and sorts over every
detection; DuckDB computes them from a stream of the few columns involved,
one concept at a time, so the driver never holds the dataset (measured in
``tests/unit/analytics/test_stats.py`` on a million rows). The
result is small and, when asked (``--save``), is written next to the output as
``stats/concepts.parquet`` and ``stats/runs.parquet`` (dashboards and later jobs
read those, not the CLI's table).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sam3ray.analytics import categories, connect, read_runs, scan, write_file
from sam3ray.output.layout import STATS_DIR, stats_path
from sam3ray.output.parquet import parquet_bytes
from sam3ray.output.readers import detections_dataset, images_dataset
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

QUANTILES = (0.1, 0.5, 0.9)

CONCEPT_STATS_SCHEMA = pa.schema(
    [
        ("category_id", pa.int32()),
        ("class_id", pa.string()),
        ("concept", pa.string()),
        ("detections", pa.int64()),
        ("images", pa.int64()),  # distinct inputs (a video counts once) with >= 1 detection
        ("score_mean", pa.float64()),
        ("score_p10", pa.float64()),
        ("score_p50", pa.float64()),
        ("score_p90", pa.float64()),
        # mean mask area in image pixels (a mask on a grid capped by max_imgsz is scaled
        # by the image's size over the grid's: areas of different grids are not comparable)
        ("mask_area_mean", pa.float64()),
    ]
)

RUN_STATS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("status", pa.string()),  # from runs/<run_id>.json (null if it has none)
        ("inputs", pa.int64()),  # images rows of this run still in the output
        ("ok", pa.int64()),
        ("errors", pa.int64()),
        ("skipped", pa.int64()),
        ("errors_by_reason", pa.map_(pa.string(), pa.int64())),
        ("detections", pa.int64()),
        ("images_per_s", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Stats:
    """Both tables, and where they were written (None when not written)."""

    concepts: pa.Table
    runs: pa.Table
    concepts_uri: str | None = None
    runs_uri: str | None = None


def concept_stats(
    output: Location,
    *,
    approx: bool = False,
    con: Any = None,
    runs: Sequence[Mapping[str, Any]] | None = None,
) -> pa.Table:
    """One row per known concept (also those without detections), by category id.

    One concept at a time (its ``class_id=`` files only, streamed through
    :func:`sam3ray.analytics.scan`), so memory follows the largest concept's
    distinct images, not the dataset. Percentiles are exact (``quantile_cont``:
    linear interpolation, as numpy and pandas) unless ``approx`` (t-digest
    ``approx_quantile`` and HyperLogLog distinct counts: constant memory).
    ``mask_area_mean`` is in image pixels, whatever grid the masks were stored on.
    """
    own = con is None
    con = con or connect(output, threads=1)
    try:
        dataset = detections_dataset(output)
        cats = categories(output, runs)
        out: dict[str, list[Any]] = {name: [] for name in CONCEPT_STATS_SCHEMA.names}
        for cat in cats:
            values = _one_concept(con, dataset, cat.class_id, approx)
            row = [cat.id, cat.class_id, cat.name, *values]
            for name, value in zip(CONCEPT_STATS_SCHEMA.names, row, strict=True):
                out[name].append(value)
    finally:
        if own:
            con.close()
    return pa.Table.from_pydict(out, schema=CONCEPT_STATS_SCHEMA)


# A detection's mask area in image pixels: ``area`` counts pixels of the ``mask_size``
# grid, which ``inference.max_imgsz`` may cap below the image. Scaled by the ratio of the
# two (the expected count; the exporters' own scaling is by nearest pixel); kept as is
# when a size is missing or zero.
_IMAGE_AREA = (
    "area * coalesce(width::DOUBLE * height / nullif(mask_size[1]::DOUBLE * mask_size[2], 0), 1)"
)


def _one_concept(con: Any, dataset: Any, class_id: str, approx: bool) -> list[Any]:
    quantile, distinct = ("approx_quantile", "approx_count_distinct(image_id)") if approx else (
        "quantile_cont", "count(DISTINCT image_id)")  # fmt: skip
    qs = ", ".join(str(q) for q in QUANTILES)
    columns = ["image_id", "score", "area", "mask_size", "width", "height"]
    reader = scan(dataset, columns, pc.field("class_id") == class_id)
    con.register("concept_rows", reader)
    try:
        n, images, mean, q, area = con.execute(
            f"SELECT count(*), {distinct}, avg(score), {quantile}(score, [{qs}]), "
            f"avg({_IMAGE_AREA}) FROM concept_rows"
        ).fetchall()[0]
    finally:
        con.unregister("concept_rows")
    return [n, images, mean, *(q or [None] * len(QUANTILES)), area]


def run_stats(
    output: Location,
    *,
    con: Any = None,
    runs: Sequence[Mapping[str, Any]] | None = None,
) -> pa.Table:
    """One row per run: counts of the images rows it owns now (a later resume or
    overwrite re-owns what it redid), errors by ``error_reason``, and the run
    summary's status and throughput. Runs with a summary but no rows left show zeros."""
    own = con is None
    con = con or connect(output, threads=1)
    runs = read_runs(output) if runs is None else runs
    columns = ["run_id", "status", "error_reason", "n_detections"]
    con.register("image_rows", scan(images_dataset(output), columns))
    try:
        groups = con.execute(
            "SELECT run_id, status, coalesce(error_reason, 'unknown'), count(*), "
            "coalesce(sum(n_detections), 0) FROM image_rows GROUP BY ALL ORDER BY 1, 4 DESC, 3"
        ).fetchall()
    finally:
        con.unregister("image_rows")
        if own:
            con.close()
    found: dict[str, dict[str, Any]] = {}
    for run_id, status, reason, n, detections in groups:
        acc = found.setdefault(run_id, {"inputs": 0, "ok": 0, "error": 0, "skipped": 0,
                                        "reasons": [], "detections": 0})  # fmt: skip
        acc["inputs"] += n
        acc["detections"] += detections
        if status in ("ok", "error", "skipped"):
            acc[status] += n
        if status == "error":
            acc["reasons"].append((reason, n))
    summaries = {r["run_id"]: r for r in runs}
    out: dict[str, list[Any]] = {name: [] for name in RUN_STATS_SCHEMA.names}
    for run_id in sorted(set(found) | set(summaries)):
        acc = found.get(run_id) or {"inputs": 0, "ok": 0, "error": 0, "skipped": 0,
                                    "reasons": [], "detections": 0}  # fmt: skip
        summary = summaries.get(run_id, {})
        rate = (summary.get("throughput") or {}).get("images_per_s")
        values = [run_id, summary.get("status"), acc["inputs"], acc["ok"], acc["error"],
                  acc["skipped"], acc["reasons"], acc["detections"], rate]  # fmt: skip
        for name, value in zip(RUN_STATS_SCHEMA.names, values, strict=True):
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=RUN_STATS_SCHEMA)


def compute_stats(
    output: Location,
    *,
    approx: bool = False,
    write: bool = False,
) -> Stats:
    """Both tables; with ``write``, also ``<output>/stats/{concepts,runs}.parquet``.

    Nothing is written unless asked: the read-side tools must work with read-only
    credentials on the lake (``sam3ray stats --save`` asks).

    DuckDB runs on one thread here: its input is one sequential stream, and a
    second thread mostly adds buffers (about +60% driver memory for no speed-up).
    """
    con = connect(output, threads=1)
    try:
        runs = read_runs(output)
        concepts = concept_stats(output, approx=approx, con=con, runs=runs)
        run_table = run_stats(output, con=con, runs=runs)
    finally:
        con.close()
    if not write:
        return Stats(concepts, run_table)
    dests = (output.child(stats_path("concepts")), output.child(stats_path("runs")))
    for dest, table in zip(dests, (concepts, run_table), strict=True):
        write_file(dest, parquet_bytes(table, {"sam3ray.stats_of": output.uri}))
    logger.info(
        "stats of %d concepts and %d runs written to %s/%s",
        len(concepts),
        len(run_table),
        output.uri.rstrip("/"),
        STATS_DIR,
    )
    return Stats(concepts, run_table, *(d.uri for d in dests))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):  # errors_by_reason as [(reason, n), ...]
        return ", ".join(f"{k}={n}" for k, n in value) or "-"
    return str(value)


def format_table(table: pa.Table, columns: Sequence[str] | None = None) -> str:
    """A plain-text table for people (numbers right-aligned, thousands separated)."""
    columns = list(columns or table.column_names)
    rows = [[_cell(v) for v in row] for row in zip(*(table[c].to_pylist() for c in columns))]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) for t in
               (table.schema.field(c).type for c in columns)]  # fmt: skip
    lines = []
    for cells in [columns, *rows]:
        parts = [
            cell.rjust(w) if num else cell.ljust(w)
            for cell, w, num in zip(cells, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
