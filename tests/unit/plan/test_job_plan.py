"""``plan_job`` reads and decides, never writes: overwrite and refusals delete nothing.

A tiny local job (PNG scenes, a concept table, a checkpoint file that planning
only checks for existence) is planned, its shards committed with the real
writer, and then planned again under other modes and settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sam3ray.core.errors import SettingsChanged
from sam3ray.output.markers import scan_markers
from sam3ray.output.schema import detections_table, images_table
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.plan.job import JobPlan, plan_job
from tests.support.jobs import CAT, INFERENCE, images_for, job_config, write_concepts

RUN = "run-committed-1"


@pytest.fixture()
def job(tmp_path):
    """A config factory for one small local job (4 images, shards of about 2)."""
    images = tmp_path / "images"
    images.mkdir()
    for name, blob in images_for(4):
        (images / name).write_bytes(blob)
    concepts = write_concepts(tmp_path / "prompts")
    checkpoint = tmp_path / "sam3.pt"
    checkpoint.write_bytes(b"never loaded by planning")

    def make(**kw):
        return job_config(
            concepts=concepts,
            checkpoint=str(checkpoint),
            output=str(tmp_path / "labels"),
            uris=[str(images)],
            shard_size=2,
            **kw,
        )

    return make


def commit_all(plan: JobPlan, cfg) -> None:
    """Commit every planned shard as a run would: one detection per image, then the marker."""
    writer = ShardWriter(cfg.output_location)
    for shard in plan.todo:
        det, img = [], []
        for ref in shard.refs:
            common = {"run_id": plan.run_id, "image_id": ref.image_id, "uri": ref.uri}
            img.append(
                {**common, "shard_id": shard.shard_id, "status": "ok", "n_detections": 1}
                | {"width": 96, "height": 72}
            )
            det.append(
                {**common, "class_id": CAT, "concept": "cat", "query": 'text:"cat"'}
                | {"score": 0.9, "box": [1.0, 2.0, 30.0, 40.0]}
            )
        writer.write(
            ShardOutput(
                shard_id=shard.shard_id,
                members_hash=shard.members_hash,
                settings_hash=shard.settings_hash,
                run_id=plan.run_id,
                detections=detections_table(det),
                images=images_table(img),
            )
        )


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def committed(job, tmp_path):
    """The job's shards, committed by run ``RUN``: (shard ids, files before)."""
    cfg = job(run_id=RUN)
    plan = plan_job(cfg)
    assert plan.skipped == () and plan.markers == {}
    assert len(plan.todo) >= 2 and all(s.kind == "image" for s in plan.todo)
    commit_all(plan, cfg)
    files = snapshot(tmp_path / "labels")
    assert sum(f.startswith("_markers/") for f in files) == len(plan.todo)
    assert any(f.startswith("detections/") for f in files)
    return {s.shard_id for s in plan.todo}, files


def test_resume_with_the_same_settings_skips_every_committed_shard(job, committed):
    shard_ids, _ = committed
    plan = plan_job(job(on_settings_change="refuse"))
    assert plan.todo == () and {s.shard_id for s in plan.skipped} == shard_ids
    assert set(plan.markers) == shard_ids and plan.relabelled == ()
    # A speed-only change is not a settings change, even for refuse.
    faster = {**INFERENCE, "images_per_batch": 1, "queries_per_forward": 2}
    assert plan_job(job(on_settings_change="refuse", inference=faster)).todo == ()


def test_overwrite_plans_every_shard_and_deletes_nothing(job, committed, tmp_path):
    shard_ids, before = committed
    plan = plan_job(job(mode="overwrite"))
    assert {s.shard_id for s in plan.todo} == shard_ids
    assert plan.skipped == () and plan.markers == {} and plan.orphans == ()
    assert plan.shards("image") == plan.todo and plan.shards("video") == ()
    assert snapshot(tmp_path / "labels") == before, "planning must not clear the output"
    assert set(scan_markers(job().output_location)) == shard_ids


def test_refused_settings_change_names_the_run_and_deletes_nothing(job, committed, tmp_path):
    _, before = committed
    changed = {**INFERENCE, "conf": INFERENCE["conf"] + 0.15}
    with pytest.raises(SettingsChanged, match=RUN) as info:
        plan_job(job(on_settings_change="refuse", inference=changed))
    assert "on_settings_change" in str(info.value)
    assert snapshot(tmp_path / "labels") == before


def test_redo_relabels_changed_shards_without_deleting(job, committed, tmp_path):
    shard_ids, before = committed
    changed = {**INFERENCE, "max_imgsz": 512}
    plan = plan_job(job(on_settings_change="redo", inference=changed))
    assert {s.shard_id for s in plan.todo} == shard_ids == set(plan.relabelled)
    assert all(plan.previous_files(sid) for sid in shard_ids)
    assert snapshot(tmp_path / "labels") == before
