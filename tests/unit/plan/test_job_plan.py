"""Planning reads and decides, never writes: overwrite, relabels and refusals delete nothing.

A small output is built by hand (``tests.support.lake``: the real commit stage and
consolidation, fake labels, no model, no Ray), then planned again under other
modes and settings with ``plan.job.prepare`` + ``plan.local.plan_locally``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sam3ray.core.errors import ConfigError, SettingsChanged
from sam3ray.core.ids import input_id
from sam3ray.plan.job import prepare, refuse_changes
from sam3ray.plan.local import TooLarge, plan_locally
from tests.support.jobs import CLASS_IDS, INFERENCE
from tests.support.lake import Lake, run_locally


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """Durability is not under test here; fsync costs ~30 ms a file on a busy CI disk."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def lake(tmp_path) -> Lake:
    """20 inputs in shards of 4, labelled and consolidated by one run."""
    lake = Lake(tmp_path / "lake", n=20, shard_size=4)
    first = run_locally(lake.config())
    assert len(first.tasks) == 5 and first.state["committed"] == 5
    lake.first_run = first.run_id
    return lake


def plan(cfg):
    return plan_locally(cfg, prepare(cfg))


def test_prepare_validates_before_listing_and_keeps_the_run_id(lake, tmp_path):
    prepared = prepare(lake.config(run_id="my-run"))
    assert prepared.run_id == "my-run"
    assert set(prepared.prints.class_ids) == set(CLASS_IDS)
    generated = prepare(lake.config(run_id=None)).run_id
    assert generated != prepare(lake.config(run_id=None)).run_id
    with pytest.raises(ConfigError, match="model.checkpoint"):
        prepare(lake.config(checkpoint=str(tmp_path / "missing.pt")))


def test_resume_with_the_same_settings_plans_nothing(lake):
    before = snapshot(lake.output)
    tasks, stats = plan(lake.config(on_settings_change="refuse"))
    assert tasks == [] and stats.tasks == 0
    assert (stats.listed, stats.done, stats.new_images) == (20, 20, 0)
    # A speed-only change is not a settings change, even for refuse.
    faster = {**INFERENCE, "images_per_batch": 1, "queries_per_forward": 2}
    cfg = lake.config(on_settings_change="refuse", inference=faster, shard_size=7)
    tasks, stats = plan(cfg)
    assert tasks == []
    refuse_changes(cfg, stats)  # does not raise
    assert snapshot(lake.output) == before, "planning writes nothing"


def test_overwrite_plans_every_input_afresh_and_deletes_nothing(lake):
    before = snapshot(lake.output)
    tasks, stats = plan(lake.config(mode="overwrite"))
    assert stats.new_images == stats.listed == 20 and stats.relabel_shards == 0
    assert all(t.fresh and t.first and set(t.concepts) == set(CLASS_IDS) for t in tasks)
    assert sorted(i for t in tasks for i in t.shard.image_ids) == sorted(
        input_id(u) for u in lake.uris
    )
    assert snapshot(lake.output) == before, "planning must not clear the output"


def test_a_refused_settings_change_names_the_run_and_deletes_nothing(lake):
    before = snapshot(lake.output)
    changed = {**INFERENCE, "conf": INFERENCE["conf"] + 0.15}
    cfg = lake.config(on_settings_change="refuse", inference=changed)
    tasks, stats = plan(cfg)
    assert len(tasks) == 5 and stats.changed_by == {lake.first_run}
    with pytest.raises(SettingsChanged, match=lake.first_run) as info:
        refuse_changes(cfg, stats)
    assert "on_settings_change" in str(info.value)
    assert snapshot(lake.output) == before


def test_redo_relabels_every_concept_of_every_shard_without_deleting(lake):
    before = snapshot(lake.output)
    changed = {**INFERENCE, "max_imgsz": 512}
    tasks, stats = plan(lake.config(on_settings_change="redo", inference=changed))
    assert len(tasks) == 5 and stats.relabel_shards == 5 and stats.relabel_inputs == 20
    for t in tasks:
        assert set(t.concepts) == set(CLASS_IDS) and t.kept == () and t.drop == ()
        assert not t.fresh and not t.first and t.previous_files
    assert {cid: kinds for cid, kinds in stats.by_concept.items()} == {
        cid: {"edited": 20} for cid in CLASS_IDS
    }
    assert snapshot(lake.output) == before


def test_a_listing_past_the_local_cap_goes_to_the_cluster_engine(lake):
    cfg = lake.config(plan={"local_max_inputs": 19})
    with pytest.raises(TooLarge):
        plan(cfg)
    assert plan(lake.config(plan={"local_max_inputs": 20}))[0] == []


def test_an_output_of_the_marker_era_is_refused_not_labelled_twice(tmp_path):
    """An output written before ``_state/`` (markers only) would be planned as empty and
    labelled again next to its old files: refused before anything starts, naming the
    output; ``mode: overwrite`` replaces it."""
    lake = Lake(tmp_path / "lake", n=8, shard_size=4)
    lake.write()
    old = lake.output / "_markers"
    old.mkdir(parents=True)
    (old / "s0123456789abcdef.json").write_text('{"shard_id": "s0123456789abcdef"}')
    with pytest.raises(ConfigError, match=r"output.uri: .*earlier sam3ray") as err:
        prepare(lake.config())
    assert str(lake.output) in str(err.value)
    assert prepare(lake.config(mode="overwrite")).concepts
    (lake.output / "_state").mkdir()  # a new-layout output keeps markers too
    (lake.output / "_state" / "x").write_text("")
    assert prepare(lake.config()).concepts
