"""``sam3ray plan CONFIG``: the dry run schedulers read (no model, no Ray for small jobs).

The output is built by hand (``tests.support.lake``: the real commit stage and
consolidation with fake labels), then ``sam3ray.cli.main(["plan", ...])`` is asked
what the next run would do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sam3ray.cli import exit_codes, main
from sam3ray.output.state import write_plan_file
from sam3ray.plan.job import prepare
from sam3ray.plan.local import plan_locally, tasks_table
from tests.support.jobs import CAT, PERSON, ROCKET
from tests.support.lake import DOG, DOG_ROW, Lake, run_locally

N = 40


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """Durability is not under test here; fsync costs ~30 ms a file on a busy CI disk."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture()
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "lake", n=N, shard_size=8)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def plan_cli(lake: Lake, capsys, *extra: str, **kw) -> tuple[int, dict]:
    path = lake.root / "job.yaml"
    path.write_text(yaml.safe_dump(lake.dict(run_id=None, **kw), sort_keys=False))
    code = main(["plan", str(path), "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_plan_on_an_empty_output_lists_everything_as_new(lake, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("a small plan starts no Ray")

    # Another test of the session may have started Ray: forbid its entry points instead.
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray.data, "from_items", no_ray)
    code, report = plan_cli(lake, capsys, plan={"images_per_s_per_gpu": 0.01})
    assert code == exit_codes.OK
    assert report["inputs"] == {
        "listed": N, "done": 0, "new": N, "new_images": N, "new_videos": 0,
        "to_label": N, "to_relabel": 0,
    }  # fmt: skip
    assert report["shards"] == {"new": 5, "relabel": 0, "drop_only": 0}
    assert report["concepts"] == {
        CAT: {"name": "cat", "new": N},
        PERSON: {"name": "person", "new": N},
        ROCKET: {"name": "rocket", "new": N},
    }
    assert report["engine"] == "local" and not report["nothing_to_do"]
    assert report["refused"] is None and report["unfinished_runs"] == {}
    assert report["estimate"]["gpu_hours"] == round(N / 0.01 / 3600, 3)
    assert not lake.output.exists(), "a dry run writes nothing"


def test_plan_after_a_run_has_nothing_to_do_and_counts_the_done(lake, capsys):
    run_locally(lake.config())
    before = snapshot(lake.output)
    code, report = plan_cli(lake, capsys, on_settings_change="refuse")
    assert code == exit_codes.OK and report["nothing_to_do"]
    assert report["inputs"]["listed"] == report["inputs"]["done"] == N
    assert report["inputs"]["new"] == 0 and report["concepts"] == {}
    assert report["estimate"]["gpu_hours"] is None, "no rate configured or measured"
    new = lake.add_inputs(2, seed=9)
    code, report = plan_cli(lake, capsys, on_settings_change="refuse")
    assert code == exit_codes.OK
    assert (report["inputs"]["done"], report["inputs"]["new"]) == (N, len(new))
    assert report["concepts"][CAT] == {"name": "cat", "new": 2}
    assert snapshot(lake.output) == before


def test_an_added_concept_is_planned_alone_and_never_refused(lake, capsys):
    run_locally(lake.config())
    lake.set_concepts(lake.concepts_csv + DOG_ROW)
    code, report = plan_cli(lake, capsys, on_settings_change="refuse")
    assert code == exit_codes.OK and report["refused"] is None
    assert report["concepts"] == {DOG: {"name": "dog", "added": N}}
    assert report["inputs"]["to_relabel"] == N and report["shards"]["relabel"] == 5


def test_an_edited_concept_exits_4_under_refuse_and_0_under_redo(lake, capsys):
    first = run_locally(lake.config())
    lake.set_concepts(lake.concepts_csv.replace(",cat,kitten,", ",cat,kitten,0.9"))
    before = snapshot(lake.output)
    code, report = plan_cli(lake, capsys, on_settings_change="refuse")
    assert code == exit_codes.SETTINGS_CHANGED == 4
    assert first.run_id in report["refused"] and "on_settings_change" in report["refused"]
    assert report["concepts"] == {CAT: {"name": "cat", "edited": N}}
    code, report = plan_cli(lake, capsys, on_settings_change="redo")
    assert code == exit_codes.OK and report["refused"] is None
    assert snapshot(lake.output) == before
    # A removed concept is a change too; its name is gone from the table.
    lake.set_concepts("".join(r + "\n" for r in lake.concepts_csv.splitlines() if ROCKET not in r))
    code, report = plan_cli(lake, capsys, on_settings_change="refuse")
    assert code == 4 and report["concepts"][ROCKET] == {"name": "(removed)", "removed": N}


def test_an_unfinished_run_is_reported_not_folded_in(lake, capsys):
    run_locally(lake.config())
    lake.add_inputs(3, seed=4)
    dead = lake.config(run_id="20991231T000000Z-dead00")
    tasks, _ = plan_locally(dead, prepare(dead))
    write_plan_file(dead.output_location, dead.run_id, tasks_table(tasks))
    before = snapshot(lake.output)
    code, report = plan_cli(lake, capsys)
    assert code == exit_codes.OK and list(report["unfinished_runs"]) == [dead.run_id]
    assert report["inputs"]["new"] == 3
    assert snapshot(lake.output) == before


def test_plan_prints_text_and_exits_2_on_a_bad_config(lake, capsys, tmp_path):
    run_locally(lake.config())
    path = lake.root / "job.yaml"
    path.write_text(yaml.safe_dump(lake.dict(run_id=None), sort_keys=False))
    assert main(["plan", str(path)]) == exit_codes.OK
    text = capsys.readouterr().out
    assert f"{N} listed, {N} done, 0 new" in text and "nothing to do" in text
    bad = lake.dict(run_id=None, checkpoint=str(tmp_path / "missing.pt"))
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    assert main(["plan", str(path), "--json"]) == exit_codes.BAD_CONFIG
    assert "model.checkpoint" in capsys.readouterr().err
