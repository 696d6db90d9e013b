"""The output's own state (``output.state``): plans, commit keys, index and shards tables.

Replaces the orphan reconciliation of content-defined shards: a shard is never
re-cut, so no shard is ever orphaned; what a dead run left is found from its plan
and the keys of its commits (tests/unit/plan/test_plan_local.py runs that end to end).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from sam3ray.core.ids import input_id
from sam3ray.core.shards import Shard, ShardTask, VideoInfo, VideoSpan
from sam3ray.output.layout import detections_path, images_path
from sam3ray.output.state import (
    INDEX_DIR,
    INDEX_SCHEMA,
    N_BUCKETS,
    SHARDS_DIR,
    SHARDS_SCHEMA,
    bucket_of,
    commit_key,
    committed,
    current_shards,
    done_inputs,
    index_rows,
    latest_shards,
    possible_files,
    read_plan,
    run_record,
    shard_from_row,
    shard_row,
    state_buckets,
    task_from_row,
    task_row,
    tasks_table,
    unfinished_runs,
    write_bucket,
    write_plan_file,
    write_run_record,
)
from sam3ray.plan.shards import image_shard_id
from sam3ray.storage.location import Location

CAT = "6f1c2a4e-1b7d-4c1e-9a55-0d7f1c3e2b01"
DOG = "7a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c02"
URIS = tuple(f"s3://lake/{i:02d}.jpg" for i in range(4))
IDS = tuple(input_id(u) for u in URIS)
IMAGE = Shard(image_shard_id(IDS), "image", URIS, IDS)
INFO = VideoInfo("s3://lake/v.frames", 30, None, 64, 48, True, "frames", ("a.jpg", "b.jpg"))
VIDEO = Shard(
    "v" + input_id(INFO.uri) + "-0000012",
    "video",
    (INFO.uri,),
    (input_id(INFO.uri),),
    VideoSpan(1, 3, (12, 13, 14), (12, 24), INFO),
)


def test_buckets_spread_ids_of_every_kind():
    assert bucket_of("ff00000000000000") == 255 and bucket_of("s0a11") == 10
    assert bucket_of("v01abc-0000000") == 1
    ids = [input_id(f"s3://x/{i}.jpg") for i in range(4000)]
    per = {}
    for i in ids:
        per[bucket_of(i)] = per.get(bucket_of(i), 0) + 1
    assert set(per) == set(range(N_BUCKETS)), "every bucket used"
    assert max(per.values()) < 3 * len(ids) / N_BUCKETS


@pytest.mark.parametrize("shard", [IMAGE, VIDEO], ids=["image", "video"])
def test_a_task_survives_its_plan_row(shard):
    task = ShardTask(
        shard,
        concepts=(CAT,),
        prints=((CAT, "a"), (DOG, "b")),
        drop=("1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e03",),
        fresh=False,
        previous_files=(images_path(shard.shard_id),),
        first=False,
    )
    row = task_row(task)
    assert json.loads(json.dumps(row)) == row, "plain JSON-able values"
    assert task_from_row(row) == task
    table = tasks_table([task, ShardTask(shard, (CAT, DOG))])
    back = [task_from_row(r) for r in table.to_pylist()]
    assert back == [task, ShardTask(shard, (CAT, DOG))]
    shard_back, prints = shard_from_row(shard_row(row, "run-1", errors=True))
    assert shard_back == shard and prints == {CAT: "a", DOG: "b"}


def test_index_rows_come_from_first_commits_only_and_count_video_parts():
    first = task_row(ShardTask(IMAGE, (CAT,)))
    assert index_rows(first) == [
        {"image_id": i, "uri": u, "shard_id": IMAGE.shard_id, "parts": 1} for i, u in zip(IDS, URIS)
    ]
    assert index_rows(task_row(ShardTask(IMAGE, (CAT,), fresh=False, first=False))) == []
    (video,) = index_rows(task_row(ShardTask(VIDEO, (CAT,))))
    assert video == {
        "image_id": VIDEO.image_ids[0],
        "uri": INFO.uri,
        "shard_id": VIDEO.shard_id,
        "parts": 3,
    }


def test_commit_keys_are_listed_not_read(tmp_path):
    out = Location(str(tmp_path / "labels"))
    a, b = "s" + "0a" * 8, "s" + "0a" + "1" * 14
    out.child(commit_key("run-1", a)).write_bytes(b"{}")
    out.child(commit_key("run-1", b, errors=True)).write_bytes(b"{}")
    out.child(commit_key("run-2", "s" + "ff" * 8)).write_bytes(b"{}")
    assert commit_key("run-1", a) == f"_state/commits/run-1/0a/{a}.json"
    assert committed(out, "run-1", 10) == {a: False, b: True}
    assert committed(out, "run-1", 255) == {} and committed(out, "run-3", 10) == {}
    with pytest.raises(ValueError):
        commit_key("run-1", "../x")


def test_the_latest_run_names_a_shards_current_state(tmp_path):
    out = Location(str(tmp_path / "labels"))
    base = task_row(ShardTask(IMAGE, (CAT,)))
    b = bucket_of(IMAGE.shard_id)
    old = shard_row({**base, "prints": json.dumps({CAT: "old"})}, "20260101T000001Z-a", False)
    new = shard_row({**base, "prints": json.dumps({CAT: "new"})}, "20260101T000002Z-b", True)
    for row in (new, old):  # written in any order
        table = pa.Table.from_pylist([row], schema=SHARDS_SCHEMA)
        write_bucket(out, SHARDS_DIR, b, row["run_id"], table)
    (row,) = current_shards(out, b).to_pylist()
    assert row["run_id"] == new["run_id"] and row["errors"]
    assert json.loads(row["prints"]) == {CAT: "new"}
    assert state_buckets(out, SHARDS_DIR) == [b] and state_buckets(out, INDEX_DIR) == []
    assert latest_shards(SHARDS_SCHEMA.empty_table()).num_rows == 0


def test_many_runs_compact_a_bucket_without_losing_a_row(tmp_path):
    out = Location(str(tmp_path / "labels"))
    runs = [f"20260101T{k:06d}Z-r" for k in range(7)]
    ids = [f"0a{k:014x}" for k in range(7)]  # all in bucket 10
    shard_bucket = bucket_of(IMAGE.shard_id)
    for run, image_id in zip(runs, ids):
        index = [{"image_id": image_id, "uri": image_id, "shard_id": "s" + image_id, "parts": 1}]
        write_bucket(out, INDEX_DIR, 10, run, pa.Table.from_pylist(index, INDEX_SCHEMA), 3)
        shard = [shard_row(task_row(ShardTask(IMAGE, (CAT,))), run, False)]
        table = pa.Table.from_pylist(shard, schema=SHARDS_SCHEMA)
        write_bucket(out, SHARDS_DIR, shard_bucket, run, table, compact_at=3)
    files = sorted((tmp_path / "labels" / "_state" / "index").rglob("*.parquet"))
    assert len(files) <= 4, [f.name for f in files]
    assert done_inputs(out, 10) == set(ids)
    (row,) = current_shards(out, shard_bucket).to_pylist()
    assert row["run_id"] == runs[-1]


def test_a_video_is_done_when_all_its_parts_are(tmp_path):
    out = Location(str(tmp_path / "labels"))
    vid = VIDEO.image_ids[0]
    rows = [
        {"image_id": vid, "uri": INFO.uri, "shard_id": f"v{vid}-{k:07d}", "parts": 3}
        for k in (0, 12)
    ]
    rows += index_rows(task_row(ShardTask(IMAGE, (CAT,))))
    for b in {bucket_of(r["image_id"]) for r in rows}:
        part = [r for r in rows if bucket_of(r["image_id"]) == b]
        write_bucket(out, INDEX_DIR, b, "run-1", pa.Table.from_pylist(part, schema=INDEX_SCHEMA))
    assert vid not in done_inputs(out, bucket_of(vid))
    assert all(i in done_inputs(out, bucket_of(i)) for i in IDS)
    last = [{"image_id": vid, "uri": INFO.uri, "shard_id": f"v{vid}-0000024", "parts": 3}]
    write_bucket(out, INDEX_DIR, bucket_of(vid), "run-2", pa.Table.from_pylist(last, INDEX_SCHEMA))
    assert vid in done_inputs(out, bucket_of(vid))


def test_plans_and_run_records_say_which_runs_died(tmp_path):
    out = Location(str(tmp_path / "labels"))
    assert unfinished_runs(out) == [] and read_plan(out, "run-1").num_rows == 0
    tasks = [ShardTask(IMAGE, (CAT,)), ShardTask(VIDEO, (CAT, DOG))]
    write_plan_file(out, "run-1", tasks_table(tasks[:1]), part=0)
    write_plan_file(out, "run-1", tasks_table(tasks[1:]), part=1)
    write_plan_file(out, "run-2", tasks_table(tasks[:1]))
    assert [task_from_row(r) for r in read_plan(out, "run-1").to_pylist()] == tasks
    assert unfinished_runs(out) == ["run-1", "run-2"]
    assert unfinished_runs(out, before="run-2") == ["run-1"], "the current run is not dead"
    write_run_record(out, "run-1", {"run_id": "run-1", "committed": 2})
    assert run_record(out, "run-1") == {"run_id": "run-1", "committed": 2}
    assert run_record(out, "run-2") is None and unfinished_runs(out) == ["run-2"]


def test_possible_files_name_every_file_a_shard_can_have_for_its_concepts():
    sid = IMAGE.shard_id
    assert possible_files(sid, [DOG, CAT]) == [
        images_path(sid),
        detections_path(CAT, sid),
        detections_path(DOG, sid),
    ]
    with pytest.raises(ValueError):
        possible_files(sid, ["not-a-uuid"])
