"""The output's own state: what is labelled, with which settings, by which run.

Petabyte outputs cannot be resumed by reading one marker per shard (10^7 GETs)
or one ``images`` file per shard. So each run consolidates what it committed
into a few Parquet files, partitioned by a hash bucket of the key, and planning
reads those with column pruning:

    _state/plans/<run_id>/*.parquet                every task a run planned (written first)
    _state/commits/<run_id>/<hh>/<shard_id>.json   one empty-ish key per committed task (last)
    _state/index/bucket=<bb>/<run_id>.parquet      image_id, uri, shard_id: inputs first labelled
    _state/shards/bucket=<bb>/<run_id>.parquet     per shard: members, per-concept fingerprints
    _state/runs/<run_id>.json                      the run's state is consolidated (or refused)

A run's index and shards rows are derived from its plan and the *keys* of its
commits (a listing, no GET per shard), after the run or, when it died, by the
next run; so the done-set is never stale and a failed read never means "not
done". A shard's latest shards row (by run id) is its current state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from sam3ray.core.shards import Shard, ShardTask, VideoInfo, VideoSpan
from sam3ray.output.layout import STATE_DIR, detections_path, images_path, safe_name
from sam3ray.storage.location import Location

PLANS_DIR = f"{STATE_DIR}/plans"
COMMITS_DIR = f"{STATE_DIR}/commits"
INDEX_DIR = f"{STATE_DIR}/index"
SHARDS_DIR = f"{STATE_DIR}/shards"
RUN_RECORDS_DIR = f"{STATE_DIR}/runs"
#: Hash buckets of image ids (index) and shard ids (shards): 256 keeps a bucket of a
#: 10^9-input lake at ~4 M ids, one task's worth.
N_BUCKETS = 256

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("shard_id", pa.string()),
        ("parts", pa.int32()),  # shards the input is cut into (videos); 1 for an image
    ]
)
#: One planned task, and (once committed) one shards-table row.
TASK_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("kind", pa.string()),  # image | video
        ("uris", pa.list_(pa.string())),
        ("image_ids", pa.list_(pa.string())),
        ("span", pa.string()),  # video shards: JSON of core.shards.VideoSpan
        ("prints", pa.string()),  # JSON {class_id: fingerprint} after the task
        ("concepts", pa.list_(pa.string())),  # labelled by this task
        ("drop", pa.list_(pa.string())),  # removed by this task
        ("fresh", pa.bool_()),  # every concept labelled from scratch
        ("first", pa.bool_()),  # the shard's first commit: its inputs enter the index
        ("previous", pa.list_(pa.string())),  # files an earlier commit may have left
    ]
)
SHARDS_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("kind", pa.string()),
        ("uris", pa.list_(pa.string())),
        ("image_ids", pa.list_(pa.string())),
        ("span", pa.string()),
        ("prints", pa.string()),
        ("run_id", pa.string()),
        ("errors", pa.bool_()),  # some input ended in error (output.retry_errors redoes it)
    ]
)


def bucket_of(key: str) -> int:
    """The hash bucket of an image id (hex) or a shard id (``s``/``v`` + hex)."""
    digits = key[1:3] if key[:1] in ("s", "v") else key[:2]
    return int(digits, 16) % N_BUCKETS


def bucket_dir(folder: str, bucket: int) -> str:
    return f"{folder}/bucket={bucket:03d}"


def plan_dir(run_id: str) -> str:
    return f"{PLANS_DIR}/{safe_name(run_id, 'run_id')}"


def commits_dir(run_id: str) -> str:
    return f"{COMMITS_DIR}/{safe_name(run_id, 'run_id')}"


def commit_key(run_id: str, shard_id: str, errors: bool = False) -> str:
    """The key whose existence says "``run_id`` committed this task of ``shard_id``".

    Its name also says whether an input ended in error, so consolidation needs a
    listing only (no GET per shard).
    """
    safe_name(shard_id, "shard_id")
    return (
        f"{commits_dir(run_id)}/{bucket_of(shard_id):02x}/{shard_id}{_ERR if errors else ''}.json"
    )


_ERR = ".errors"


def run_record_path(run_id: str) -> str:
    return f"{RUN_RECORDS_DIR}/{safe_name(run_id, 'run_id')}.json"


def possible_files(shard_id: str, class_ids: Iterable[str]) -> list[str]:
    """Every file a shard can have for these concepts (deletes of absent ones are no-ops)."""
    return [images_path(shard_id), *(detections_path(c, shard_id) for c in sorted(class_ids))]


# -- tasks as rows ---------------------------------------------------------------------------


def span_json(span: VideoSpan | None) -> str | None:
    if span is None:
        return None
    data = asdict(span)
    if span.info is not None:
        data["info"]["frame_uris"] = list(span.info.frame_uris)
    return json.dumps(data, sort_keys=True)


def span_from(text: str | None) -> VideoSpan | None:
    if not text:
        return None
    d = json.loads(text)
    info = d.pop("info")
    if info is not None:
        info = VideoInfo(**{**info, "frame_uris": tuple(info.get("frame_uris") or ())})
    return VideoSpan(
        index=d["index"],
        n_shards=d["n_shards"],
        frames=tuple(d["frames"]),
        owned=tuple(d["owned"]),
        info=info,
        error_reason=d.get("error_reason"),
        error=d.get("error"),
    )


def task_row(task: ShardTask) -> dict[str, Any]:
    s = task.shard
    return {
        "shard_id": s.shard_id,
        "kind": s.kind,
        "uris": list(s.uris),
        "image_ids": list(s.image_ids),
        "span": span_json(s.span),
        "prints": json.dumps(dict(task.prints), sort_keys=True),
        "concepts": list(task.concepts),
        "drop": list(task.drop),
        "fresh": task.fresh,
        "first": task.first,
        "previous": list(task.previous_files),
    }


def _shard_of(row: Mapping[str, Any]) -> Shard:
    """The shard of a plan row or a shards-table row (the same columns)."""
    return Shard(
        shard_id=row["shard_id"],
        kind=row["kind"],
        uris=tuple(row["uris"]),
        image_ids=tuple(row["image_ids"]),
        span=span_from(row.get("span")),
    )


def task_from_row(row: Mapping[str, Any]) -> ShardTask:
    return ShardTask(
        shard=_shard_of(row),
        concepts=tuple(row["concepts"]),
        prints=tuple(sorted(json.loads(row["prints"]).items())),
        drop=tuple(row.get("drop") or ()),
        fresh=bool(row["fresh"]),
        previous_files=tuple(row.get("previous") or ()),
        first=bool(row["first"]),
    )


def tasks_table(tasks: Sequence[ShardTask]) -> pa.Table:
    return pa.Table.from_pylist([task_row(t) for t in tasks], schema=TASK_SCHEMA)


def shard_row(task_row: Mapping[str, Any], run_id: str, errors: bool) -> dict[str, Any]:
    """The shards-table row a committed task leaves."""
    keep = {k: task_row[k] for k in SHARDS_SCHEMA.names if k not in ("run_id", "errors")}
    return keep | {"run_id": run_id, "errors": errors}


def index_rows(task_row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The index rows a shard's first commit adds (an image shard's members, or one row
    for a video shard, counted against the video's number of shards)."""
    if not task_row["first"]:
        return []
    parts = 1
    if task_row["kind"] == "video":
        parts = json.loads(task_row["span"])["n_shards"]
    return [
        {"image_id": i, "uri": u, "shard_id": task_row["shard_id"], "parts": parts}
        for i, u in zip(task_row["image_ids"], task_row["uris"], strict=True)
    ]


def shard_from_row(row: Mapping[str, Any]) -> tuple[Shard, dict[str, str]]:
    """A shards-table row as (shard, current fingerprints)."""
    return _shard_of(row), json.loads(row["prints"])


def latest_shards(table: pa.Table) -> pa.Table:
    """One row per shard: the one written by the latest run (run ids sort by start time)."""
    if table.num_rows == 0:
        return table
    order = table.sort_by([("shard_id", "ascending"), ("run_id", "descending")])
    ids = order.column("shard_id").to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    return order.take(pa.array(keep, pa.int64()))


# -- reading and writing state files ---------------------------------------------------------


def _bucket_files(output: Location, folder: str, bucket: int) -> list[Location]:
    where = output.child(bucket_dir(folder, bucket))
    return [where.child(n) for n in sorted(where.list_names()) if n.endswith(".parquet")]


def _read_all(files: list[Location], schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    from sam3ray.output.parquet import read_table

    parts = [read_table(f, columns=columns) for f in files]
    if not parts:
        names = columns or schema.names
        return pa.schema([schema.field(n) for n in names]).empty_table()
    return pa.concat_tables(parts, promote_options="default")


@dataclass(frozen=True)
class Held:
    """What one bucket's index says the output holds: inputs held whole, and the
    committed shards of videos held in part (a run died between their shards; the next
    run labels only the missing ones, never the committed ones again)."""

    done: frozenset[str] = frozenset()
    video_shards: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def missing(self, task: ShardTask) -> bool:
        """Whether a freshly cut task still has to run."""
        ids = task.shard.image_ids
        return not (len(ids) == 1 and task.shard_id in self.video_shards.get(ids[0], ()))


def held_inputs(output: Location, bucket: int) -> Held:
    """One bucket's :class:`Held`, read from its index files."""
    files = _bucket_files(output, INDEX_DIR, bucket)
    table = _read_all(files, INDEX_SCHEMA, ["image_id", "shard_id", "parts"])
    shards: dict[str, set[str]] = {}
    parts: dict[str, int] = {}
    for row in table.to_pylist():
        shards.setdefault(row["image_id"], set()).add(row["shard_id"])
        parts[row["image_id"]] = row["parts"] or 1
    done = frozenset(i for i, s in shards.items() if len(s) >= parts[i])
    partial = {i: frozenset(s) for i, s in shards.items() if i not in done}
    return Held(done, partial)


def done_inputs(output: Location, bucket: int) -> set[str]:
    """Ids of the inputs of one bucket that the output holds whole: an image in a
    committed shard, a video whose every shard is committed."""
    return set(held_inputs(output, bucket).done)


def current_shards(output: Location, bucket: int) -> pa.Table:
    """The latest shards-table row of every committed shard in one bucket."""
    return latest_shards(_read_all(_bucket_files(output, SHARDS_DIR, bucket), SHARDS_SCHEMA, None))


def state_buckets(output: Location, folder: str) -> list[int]:
    """Buckets that hold state files (skip the empty ones on a young output)."""
    out = []
    for name in output.child(folder).list_names():
        if name.startswith("bucket="):
            out.append(int(name.split("=", 1)[1]))
    return sorted(out)


def write_bucket(
    output: Location, folder: str, bucket: int, run_id: str, table: pa.Table, compact_at: int = 64
) -> None:
    """One run's rows of one bucket, as one file; past ``compact_at`` files the bucket is
    merged into one (readers tolerate the moment both exist: ids are sets, shards rows
    are de-duplicated by run)."""
    from sam3ray.output.parquet import parquet_bytes

    if table.num_rows == 0:
        return
    where = output.child(bucket_dir(folder, bucket))
    where.child(f"{safe_name(run_id, 'run_id')}.parquet").write_bytes(parquet_bytes(table))
    files = _bucket_files(output, folder, bucket)
    if len(files) > compact_at:
        schema = INDEX_SCHEMA if folder == INDEX_DIR else SHARDS_SCHEMA
        merged = _read_all(files, schema, None)
        if folder == SHARDS_DIR:
            merged = latest_shards(merged)
        where.child(f"compact-{run_id}.parquet").write_bytes(parquet_bytes(merged))
        for f in files:
            f.delete()


def committed(output: Location, run_id: str, bucket: int) -> dict[str, bool]:
    """shard id -> "some input ended in error", for every task ``run_id`` committed in one
    shard bucket (a listing of keys)."""
    names = output.child(f"{commits_dir(run_id)}/{bucket:02x}").list_names()
    out = {}
    for name in names:
        if not name.endswith(".json"):
            continue
        stem = name[: -len(".json")]
        errors = stem.endswith(_ERR)
        out[stem[: -len(_ERR)] if errors else stem] = errors
    return out


def runs_with_plans(output: Location) -> list[str]:
    return sorted(output.child(PLANS_DIR).list_names())


def run_record(output: Location, run_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(output.child(run_record_path(run_id)).read_bytes())
    except FileNotFoundError:
        return None


def write_run_record(output: Location, run_id: str, record: Mapping[str, Any]) -> None:
    data = json.dumps(dict(record), indent=1, sort_keys=True).encode()
    output.child(run_record_path(run_id)).write_bytes(data)


def unfinished_runs(output: Location, before: str | None = None) -> list[str]:
    """Runs that planned work but never consolidated it (they died): their commits must
    be folded into the state and their leftovers removed before planning again."""
    return [r for r in runs_with_plans(output) if r != before and run_record(output, r) is None]


def write_plan_file(output: Location, run_id: str, table: pa.Table, part: int | str = 0) -> None:
    """One file of a run's plan (task rows); ``part`` names it (a retried writer writes
    the same name)."""
    from sam3ray.output.parquet import parquet_bytes

    name = f"part-{part:05d}" if isinstance(part, int) else f"part-{safe_name(part, 'part')}"
    output.child(plan_dir(run_id)).child(f"{name}.parquet").write_bytes(parquet_bytes(table))


def plan_files(output: Location, run_id: str) -> list[Location]:
    """The files of a run's plan, in name order."""
    where = output.child(plan_dir(run_id))
    return [where.child(n) for n in sorted(where.list_names()) if n.endswith(".parquet")]


def read_plan_file(loc: Location, columns: list[str] | None = None) -> pa.Table:
    """One plan file, in the task schema (retried like every state read)."""
    return _read_all([loc], TASK_SCHEMA, columns)


def read_plan(output: Location, run_id: str) -> pa.Table:
    """A run's whole plan (small runs; large ones are read by the cluster)."""
    return _read_all(plan_files(output, run_id), TASK_SCHEMA, None)
