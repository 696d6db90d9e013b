"""What the read-side tools share: DuckDB views, streams, runs, the concept catalogue.

Everything in ``analytics`` only *reads* what the writer left
(``output.readers.detections_dataset`` / ``images_dataset``: pyarrow datasets
on any fsspec filesystem, S3 included) and must work on outputs far larger
than the driver's memory. So every module hands the scanning, grouping and
sorting to DuckDB over those datasets (column projection and filters are
pushed into the pyarrow scan; sorts and hash tables spill to disk past a
memory limit) and the Python side only holds one record batch at a time.

This module holds what the tools share: the DuckDB connection with the two
views, a lean file-by-file stream (``scan``), the run summaries, the concept
catalogue (stable COCO category ids) and writing result files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sam3ray.output.layout import OUTPUT_DIRS, RUNS_DIR
from sam3ray.output.readers import detections_dataset, images_dataset
from sam3ray.sources.prompts import load_concepts
from sam3ray.storage.location import Location

if TYPE_CHECKING:
    import duckdb

logger = logging.getLogger(__name__)

#: Rows per record batch the driver pulls from DuckDB or a Parquet file.
BATCH_ROWS = 8192


@dataclass(frozen=True)
class Category:
    """One concept as the exports number it: ``id`` is 1..N by sorted class UUID."""

    id: int
    class_id: str
    name: str


def check_output(output: Location) -> None:
    """Raise FileNotFoundError unless ``output`` holds a sam3ray output (a typo in the
    path must not read as "zero detections", nor create a stats folder there)."""
    output.refresh()
    if not any(output.child(sub).exists() for sub in OUTPUT_DIRS):
        raise FileNotFoundError(
            f"no sam3ray output at {output.uri} (no {', '.join(d + '/' for d in OUTPUT_DIRS)})"
        )


def connect(
    output: Location,
    *,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views ``det`` (detections, ``class_id`` from the Hive path)
    and ``img`` (images rows) over the output.

    DuckDB's own S3 support would need the httpfs extension (a download at run
    time); scanning the pyarrow datasets instead reuses the writer's fsspec
    filesystems and storage options, with projection and filter pushdown.
    ``memory_limit`` (default: env ``SAM3RAY_DUCKDB_MEMORY``, else a quarter of the
    RAM) bounds DuckDB; above it, sorts, joins and aggregates spill to a temporary
    directory.
    """
    import duckdb

    check_output(output)
    config: dict[str, Any] = {
        "threads": threads or min(4, os.cpu_count() or 1),
        "preserve_insertion_order": False,
        "temp_directory": os.path.join(tempfile.gettempdir(), f"sam3ray-duckdb-{os.getpid()}"),
    }
    limit = memory_limit or os.environ.get("SAM3RAY_DUCKDB_MEMORY")
    if not limit and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            limit = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 4 >> 20}MB"
    if limit:
        config["memory_limit"] = limit
    con = duckdb.connect(config=config)
    con.execute("SET enable_progress_bar = false")
    con.register("det", detections_dataset(output))
    con.register("img", images_dataset(output))
    return con


def scan(
    dataset: ds.Dataset, columns: Sequence[str], partition: ds.Expression | None = None
) -> pa.RecordBatchReader:
    """The dataset's ``columns`` as a stream, one file at a time, no read-ahead.

    Why not DuckDB's own scan of the dataset: pyarrow's dataset scanner reads
    several files ahead on many threads, which is fast but costs a driver
    memory that grows with file and batch sizes; aggregates that must stay
    small (``stats``) read through this instead. ``partition`` (on ``class_id``)
    only selects files; partition columns are filled from the directory names.
    """
    schema = pa.schema([dataset.schema.field(c) for c in columns])

    def batches() -> Iterator[pa.RecordBatch]:
        for fragment in dataset.get_fragments(filter=partition):
            keys = ds.get_partition_keys(fragment.partition_expression)
            in_file = [c for c in columns if c not in keys]
            with dataset.filesystem.open_input_file(fragment.path) as f:
                parquet = pq.ParquetFile(f, pre_buffer=False)
                for batch in parquet.iter_batches(BATCH_ROWS, columns=in_file, use_threads=False):
                    n = batch.num_rows
                    arrays = [
                        pa.array([keys[c]] * n, schema.field(c).type) if c in keys
                        else batch.column(c).cast(schema.field(c).type)
                        for c in columns
                    ]  # fmt: skip
                    yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def batches(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
) -> Iterator[pa.RecordBatch]:
    """A query's result as record batches of ``BATCH_ROWS`` (DuckDB keeps the rest;
    a DB-API ``execute`` + fetch would first copy every row)."""
    if isinstance(params, Mapping):
        params = dict(params)
    elif params is not None:
        params = list(params)
    relation = con.sql(sql, params=params or None)
    fetch = getattr(relation, "to_arrow_reader", None) or relation.fetch_record_batch  # 2.x / 1.x
    yield from fetch(BATCH_ROWS)


def stream(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of a query as dicts, one record batch at a time."""
    for batch in batches(con, sql, params):
        yield from batch.to_pylist()


def read_runs(output: Location) -> list[dict[str, Any]]:
    """All ``runs/<run_id>.json`` summaries, oldest first (run ids sort by start time)."""
    folder = output.child(RUNS_DIR)
    runs = []
    for name in sorted(n for n in folder.list_names() if n.endswith(".json")):
        try:
            data = json.loads(folder.child(name).read_bytes())
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable run summary %s/%s: %s", folder.uri, name, exc)
            continue
        if isinstance(data, dict):
            data.setdefault("run_id", name[: -len(".json")])
            runs.append(data)
    return runs


def _concept_table_names(runs: Sequence[Mapping[str, Any]], output: Location) -> dict[str, str]:
    """class_id -> name from every concept table the runs used (best effort: a moved
    or unreadable table only costs the names of concepts that found nothing).

    A table is read with the output's storage options if it has any, else with
    those the run's config gave its inputs."""
    names: dict[str, str] = {}
    seen: set[str] = set()
    for run in runs:
        config = run.get("config") or {}
        uri = (config.get("prompts") or {}).get("concepts")
        if not isinstance(uri, str) or uri in seen:
            continue
        seen.add(uri)
        opts = output.options or (config.get("input") or {}).get("storage_options") or {}
        try:
            concepts = load_concepts(Location(uri, opts))
        except Exception as exc:  # a stale path must not stop the stats
            logger.warning("concept table %s of run %s unreadable: %s", uri, run.get("run_id"), exc)
            continue
        for concept in concepts:  # runs come oldest first: the latest name wins
            names[concept.class_id] = concept.name
    return names


def categories(output: Location, runs: Sequence[Mapping[str, Any]] | None = None) -> list[Category]:
    """Every concept known to the output: the runs' concept tables plus every
    ``class_id=`` partition. Ids are 1..N by sorted UUID, so they do not change
    when a concept is filtered out of one export or finds nothing in one run."""
    runs = read_runs(output) if runs is None else runs
    names = _concept_table_names(runs, output)
    dataset = detections_dataset(output)
    for fragment in dataset.get_fragments():
        class_id = ds.get_partition_keys(fragment.partition_expression).get("class_id")
        if not class_id or class_id in names:
            continue
        with dataset.filesystem.open_input_file(fragment.path) as f:  # one value of one file
            first = next(pq.ParquetFile(f).iter_batches(1, columns=["concept"]), None)
        value = first.column(0)[0].as_py() if first is not None and first.num_rows else None
        names[class_id] = value or class_id
    ordered = sorted(names, key=lambda c: uuid.UUID(c).hex)
    return [Category(i, cid, names[cid]) for i, cid in enumerate(ordered, 1)]


def select_categories(cats: Sequence[Category], wanted: Sequence[str] | None) -> list[Category]:
    """The categories named by ``wanted`` (names, case-insensitive, or class UUIDs);
    all of them if ``wanted`` is empty. Unknown names raise ValueError listing the known."""
    if not wanted:
        return list(cats)
    by_key = {c.class_id: c for c in cats} | {c.name.casefold(): c for c in cats}
    chosen, unknown = [], []
    for item in wanted:
        cat = by_key.get(item) or by_key.get(item.casefold())
        if cat is None:
            unknown.append(item)
        elif cat not in chosen:
            chosen.append(cat)
    if unknown:
        known = ", ".join(f"{c.name} ({c.class_id})" for c in cats) or "none"
        raise ValueError(f"unknown concept(s) {unknown}; known: {known}")
    return sorted(chosen, key=lambda c: c.id)


def sql_list(values: Sequence[str]) -> str:
    """A SQL list literal of strings (class UUIDs, already validated, so quoting suffices)."""
    return "(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


class _Destination:
    """The text file :func:`open_output` hands out: a refusal of the store while writing
    (an upload may start before the close, once a part is full) names the file; the
    caller's own errors never pass through here."""

    def __init__(self, f: IO[str], uri: str) -> None:
        self._f, self._uri = f, uri

    def write(self, text: str) -> int:
        try:
            return self._f.write(text)
        except PermissionError as exc:
            raise _refused(self._uri, exc) from exc


def _refused(uri: str, exc: PermissionError) -> PermissionError:
    """Read-only credentials: say which file was refused (the store's own message may not)."""
    return PermissionError(f"cannot write {uri}: {exc}")


@contextlib.contextmanager
def open_output(dest: Location) -> Iterator[IO[str]]:
    """A text file to stream a large export into (local: temp file renamed on success,
    so a crash never leaves half a JSON; object stores: one upload on close).

    Only the destination's own refusals (open, write, close) become "cannot write
    <dest>": a PermissionError of the caller's body (reading the lake, presigning)
    propagates unchanged, and a failing body is not masked by a failing close."""
    fs, path = dest.fs, dest.path
    if dest.is_local:
        directory = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return
    try:
        f = fs.open(path, "w", encoding="utf-8")
    except PermissionError as exc:
        raise _refused(dest.uri, exc) from exc
    try:
        yield cast(IO[str], _Destination(f, dest.uri))
    except BaseException:
        with contextlib.suppress(Exception):  # the body's error is the one to report
            f.close()
        raise
    try:
        f.close()
    except PermissionError as exc:
        raise _refused(dest.uri, exc) from exc


def write_file(dest: Location, data: bytes) -> None:
    """Write one small result file atomically (stats tables, thumbnails, index.html)."""
    try:
        dest.write_bytes(data)
    except PermissionError as exc:
        raise _refused(dest.uri, exc) from exc
