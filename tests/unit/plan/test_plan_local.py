"""Planning and consolidation end to end on a local output, without Ray and without a model.

An output is built by hand the way runs build it (``tests.support.lake``: the plan
written first, every task committed by the real ``CommitStage`` with fake labels,
then ``plan.local.consolidate_locally``), and planned again with
``plan.local.plan_locally`` after each change: new hash-named inputs cost only
themselves, a new concept costs only itself, a removed concept costs no labelling,
an edited concept relabels only that concept, and a run that died is folded in.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sam3ray.core.errors import SettingsChanged
from sam3ray.core.ids import input_id
from sam3ray.output.layout import detections_path, images_path, marker_path
from sam3ray.output.state import (
    SHARDS_DIR,
    bucket_of,
    commit_key,
    current_shards,
    done_inputs,
    state_buckets,
    unfinished_runs,
)
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.plan.job import prepare, refuse_changes
from sam3ray.plan.local import consolidate_locally, plan_locally, write_plan
from sam3ray.stages.commit import CommitStage
from tests.support.jobs import CAT, CLASS_IDS, PERSON, ROCKET, image_rows, read_tables
from tests.support.lake import DOG, DOG_ROW, Lake, fake_result, n_found, run_locally

N, SHARD = 100, 8
N_SHARDS = 13  # ceil(100 / 8)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """Durability is not under test here; fsync costs ~30 ms a file on a busy CI disk."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture()
def lake(tmp_path) -> Lake:
    """100 hash-named inputs, 3 concepts, labelled and consolidated by one run."""
    lake = Lake(tmp_path / "lake", n=N, shard_size=SHARD)
    first = run_locally(lake.config())
    assert len(first.tasks) == N_SHARDS and first.state["committed"] == N_SHARDS
    lake.first_run = first.run_id
    return lake


def plan(cfg):
    return plan_locally(cfg, prepare(cfg))


def assert_each_input_once(lake: Lake) -> dict[str, dict]:
    """The images-table invariant: every listed input exactly once; detections only for
    ok inputs, as many per input as its ``n_detections`` says."""
    images, detections = read_tables(str(lake.output))
    rows = image_rows(images)
    assert set(rows) == set(lake.uris)
    per_input = Counter(detections.column("image_id").to_pylist())
    for row in rows.values():
        assert per_input.get(row["image_id"], 0) == row["n_detections"], row["uri"]
    return rows


def detection_files(lake: Lake, class_id: str) -> dict[str, bytes]:
    folder = lake.output / "detections" / f"class_id={class_id}"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def test_nothing_to_do_when_nothing_changed(lake):
    tasks, stats = plan(lake.config())
    assert tasks == [] and stats.tasks == 0 and stats.inputs_to_label == 0
    assert (stats.listed, stats.done, stats.new_images, stats.new_videos) == (N, N, 0, 0)
    assert stats.to_json()["inputs"]["done"] == N
    assert_each_input_once(lake)


@pytest.mark.parametrize("n_new", [1, 10])
def test_new_hash_named_inputs_are_labelled_alone(lake, n_new):
    """+1% (and +10%) random-named inputs: the tasks cover exactly the new inputs."""
    held = {
        r["shard_id"]
        for b in state_buckets(lake.config().output_location, SHARDS_DIR)
        for r in current_shards(lake.config().output_location, b).to_pylist()
    }
    assert len(held) == N_SHARDS
    new = lake.add_inputs(n_new, seed=7)
    tasks, stats = plan(lake.config())
    covered = [i for t in tasks for i in t.shard.image_ids]
    assert sorted(covered) == sorted(input_id(u) for u in new)
    assert stats.inputs_to_label / stats.new_images == 1.0, "amplification"
    assert (stats.listed, stats.done, stats.new_images) == (N + n_new, N, n_new)
    assert stats.relabel_shards == stats.drop_shards == 0
    assert all(t.fresh and t.first and set(t.concepts) == set(CLASS_IDS) for t in tasks)
    assert not {t.shard_id for t in tasks} & held, "committed shards are never re-cut"
    assert len(tasks) == -(-n_new // SHARD)
    refuse_changes(lake.config(on_settings_change="refuse"), stats)  # never refused

    run_locally(lake.config())
    assert_each_input_once(lake)
    assert plan(lake.config())[0] == []


def test_a_new_concept_is_labelled_alone_over_every_shard(lake):
    before = {cid: detection_files(lake, cid) for cid in CLASS_IDS}
    lake.set_concepts(lake.concepts_csv + DOG_ROW)
    cfg = lake.config(on_settings_change="refuse")
    tasks, stats = plan(cfg)
    assert len(tasks) == N_SHARDS and {t.concepts for t in tasks} == {(DOG,)}
    assert all(not t.fresh and not t.first and t.drop == () for t in tasks)
    assert all(set(t.kept) == set(CLASS_IDS) for t in tasks)
    assert stats.fresh_shards == stats.new_images == 0 and stats.relabel_inputs == N
    assert stats.by_concept == {DOG: {"added": N}}
    assert stats.changed_by == set()
    refuse_changes(cfg, stats)  # adding a concept is never refused

    run_locally(lake.config())
    assert {cid: detection_files(lake, cid) for cid in CLASS_IDS} == before, "others kept"
    assert len(detection_files(lake, DOG)) > 0
    assert_each_input_once(lake)
    assert plan(lake.config())[0] == [], "the state records the new concept"


def test_a_removed_concept_is_only_dropped(lake):
    kept = {cid: detection_files(lake, cid) for cid in (CAT, PERSON)}
    assert detection_files(lake, ROCKET)
    lake.set_concepts("".join(r + "\n" for r in lake.concepts_csv.splitlines() if ROCKET not in r))
    tasks, stats = plan(lake.config())
    assert len(tasks) == N_SHARDS == stats.drop_shards and stats.relabel_shards == 0
    assert all(t.concepts == () and t.drop == (ROCKET,) for t in tasks)
    assert stats.by_concept == {ROCKET: {"removed": N}} and stats.inputs_to_label == 0
    assert stats.changed_by == {lake.first_run}
    with pytest.raises(SettingsChanged, match=lake.first_run):
        refuse_changes(lake.config(on_settings_change="refuse"), stats)

    run_locally(lake.config())
    assert detection_files(lake, ROCKET) == {}
    assert {cid: detection_files(lake, cid) for cid in (CAT, PERSON)} == kept
    assert_each_input_once(lake)  # n_detections no longer counts the dropped concept
    assert plan(lake.config())[0] == []


def test_an_edited_concept_is_relabelled_alone(lake):
    kept = {cid: detection_files(lake, cid) for cid in (CAT, PERSON)}
    lake.set_concepts(
        lake.concepts_csv.replace(f"{ROCKET},rocket,rocket,0.5", f"{ROCKET},rocket,rocket,0.6")
    )
    tasks, stats = plan(lake.config())
    assert len(tasks) == N_SHARDS and {t.concepts for t in tasks} == {(ROCKET,)}
    assert all(t.drop == () and set(t.kept) == {CAT, PERSON} for t in tasks)
    assert stats.by_concept == {ROCKET: {"edited": N}} and stats.relabel_inputs == N
    assert stats.changed_by == {lake.first_run}
    with pytest.raises(SettingsChanged, match="on_settings_change"):
        refuse_changes(lake.config(on_settings_change="refuse"), stats)

    run_locally(lake.config(), version=1)
    assert {cid: detection_files(lake, cid) for cid in (CAT, PERSON)} == kept
    assert_each_input_once(lake)
    assert plan(lake.config())[0] == []


def test_inputs_in_error_are_retried_only_when_asked(lake):
    victim = lake.add_inputs(3, seed=11)[1]
    run = run_locally(lake.config(), errors={victim})
    (task,) = run.tasks
    out = lake.config().output_location
    assert out.child(commit_key(run.run_id, task.shard_id, errors=True)).exists()
    assert assert_each_input_once(lake)[victim]["status"] == "error"
    assert plan(lake.config())[0] == []
    cfg = lake.config(retry_errors=True, on_settings_change="refuse")
    tasks, stats = plan(cfg)
    (again,) = tasks
    assert again.shard_id == task.shard_id and again.fresh and not again.first
    assert set(again.concepts) == set(CLASS_IDS)
    assert stats.by_concept == {cid: {"retried": 3} for cid in CLASS_IDS}
    assert stats.changed_by == set()
    refuse_changes(cfg, stats)  # the same settings: retrying errors is no settings change
    run_locally(lake.config(retry_errors=True))
    assert assert_each_input_once(lake)[victim]["status"] == "ok"
    assert plan(lake.config(retry_errors=True))[0] == []


def test_a_run_that_died_is_folded_in_and_its_unfinished_shards_removed(lake):
    """Plan written, two of three new shards committed, the third died after its files
    and marker but before its commit key, no run record: consolidation folds in the
    committed two, deletes the third's files, and the next plan lists its inputs again."""
    new = lake.add_inputs(20, seed=3)
    cfg = lake.config()
    prepared = prepare(cfg)
    tasks, _ = plan_locally(cfg, prepared)
    assert len(tasks) == 3 and sum(len(t.shard) for t in tasks) == 20
    out = cfg.output_location
    write_plan(out, prepared.run_id, tasks)
    names = {c.class_id: c.name for c in prepared.concepts}
    stage = CommitStage(out, prepared.run_id)
    for task in tasks[:2]:
        stage.process(fake_result(task, prepared.run_id, names))
    dead = tasks[2]
    half = fake_result(dead, prepared.run_id, names)
    ShardWriter(out).write(
        ShardOutput(dead.shard_id, prepared.run_id, half.detections, half.images, dead.prints)
    )  # files and marker, no commit key: the process died here
    sid = dead.shard_id
    written = [images_path(sid), marker_path(sid)]
    written += [
        detections_path(c, sid) for c in set(half.detections.column("class_id").to_pylist())
    ]
    assert all(out.child(p).exists() for p in written)
    assert unfinished_runs(out) == [prepared.run_id]

    counts = consolidate_locally(out, prepared.run_id, cfg.plan.local_max_inputs)
    assert counts == {"tasks": 3, "committed": 2, "uncommitted": 1, "leftovers_removed": 1}
    out.refresh()
    assert not any(out.child(p).exists() for p in written), "nothing of it stays visible"
    assert unfinished_runs(out) == []
    for task in tasks:  # committed shards enter the shards table and the index
        b = bucket_of(task.shard_id)
        in_table = task.shard_id in current_shards(out, b).column("shard_id").to_pylist()
        assert in_table == (task is not dead)
        for image_id in task.shard.image_ids:
            assert (image_id in done_inputs(out, bucket_of(image_id))) == (task is not dead)

    again, stats = plan(lake.config())
    assert sorted(i for t in again for i in t.shard.image_ids) == sorted(dead.shard.image_ids)
    assert stats.new_images == len(dead.shard) and stats.done == N + 20 - len(dead.shard)
    assert set(dead.shard.uris) <= set(new)
    run_locally(lake.config())
    assert_each_input_once(lake)


def test_a_relabel_that_died_is_redone_and_keeps_the_shards_files(lake):
    lake.set_concepts(lake.concepts_csv + DOG_ROW)
    first = plan(lake.config())[0]
    skipped = first[4].shard_id
    before = {p: p.read_bytes() for p in Path(lake.output).rglob(f"part-{skipped}.parquet")}
    run = run_locally(lake.config(), skip={skipped})
    assert run.state["uncommitted"] == 1 and run.state["leftovers_removed"] == 0
    after = {p: p.read_bytes() for p in Path(lake.output).rglob(f"part-{skipped}.parquet")}
    assert after == before, "a committed shard keeps its files"
    tasks, _ = plan(lake.config())
    assert [(t.shard_id, t.concepts) for t in tasks] == [(skipped, (DOG,))]
    run_locally(lake.config())
    assert_each_input_once(lake)
    shard = next(t.shard for t in first if t.shard_id == skipped)
    want = sum(n_found(i, DOG, 0) for i in shard.image_ids)
    assert want > 0, "a shard without dogs: the check below is vacuous"
    assert pq.read_table(lake.output / detections_path(DOG, skipped)).num_rows == want
