"""The command line without Ray: exit codes and the messages a person acts on.

``sam3ray run`` is driven through ``sam3ray.cli.main(argv)``; where a job outcome
is needed, ``sam3ray.runner.job.run_job`` is replaced (the CLI imports it when the
command runs), so no cluster starts. The config tests go through the real
``run_job``: their errors come before Ray, and the test checks that it never started.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sam3ray.cli import exit_codes, main
from sam3ray.core.errors import (
    ConfigError,
    DecodeError,
    InputError,
    JobFailed,
    PromptTableError,
    SettingsChanged,
    StorageError,
)
from tests.support.jobs import job_dict, write_concepts

REPO = Path(__file__).resolve().parents[3]


def _config(tmp_path: Path, *, concepts: str | None = None, **output_extra: Any) -> Path:
    """A schema-valid job file (its paths are only checked when the job plans)."""
    data = job_dict(
        concepts=concepts or write_concepts(tmp_path / "tables"),
        checkpoint=str(tmp_path / "sam3-tiny.pt"),
        output=str(tmp_path / "out"),
        uris=[str(tmp_path / "images")],
        **output_extra,
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _summary(**extra: Any) -> dict[str, Any]:
    """The fields ``sam3ray.cli.report.summary_text`` reads, nothing more."""
    return {
        "run_id": "20260101T000000Z-abcdef",
        "status": "failed",
        "inputs_total": 10,
        "inputs_processed": 8,
        "inputs_skipped_done": 2,
        "ok": 4,
        "errors": 4,
        "errors_by_reason": {"not_an_image": 3, "truncated": 1},
        "detections": 7,
        "detections_by_concept": {"cat": 5, "person": 2},
        "throughput": {"images_per_s": 1.5},
        "timing_s": {"ray_init": 0.5, "first_shard": 1.0, "total": 6.0},
        "output": "/data/labels/",
        "summary_uri": "/data/labels/runs/20260101T000000Z-abcdef.json",
        **extra,
    }


@pytest.fixture
def fake_run_job(monkeypatch):
    """Replace ``run_job`` by one that records its configs and raises ``error``."""
    calls: list[Any] = []

    def install(error: BaseException | None = None) -> list[Any]:
        def run_job(cfg):
            calls.append(cfg)
            if error is not None:
                raise error
            return _summary(status="succeeded")

        monkeypatch.setattr("sam3ray.runner.job.run_job", run_job)
        return calls

    return install


def test_unknown_key_is_refused_before_the_job(tmp_path, capsys, fake_run_job):
    calls = fake_run_job()
    path = _config(tmp_path, shard_sise=3)  # a typo of output.shard_size
    assert main(["run", str(path)]) == exit_codes.BAD_CONFIG == 2
    err = capsys.readouterr().err
    assert f"{path}: output.shard_sise:" in err
    assert "allowed:" in err and "shard_size" in err  # what the user meant is listed
    assert calls == []
    assert not (tmp_path / "out").exists()


def test_missing_concepts_file_names_file_and_field(tmp_path, capsys, monkeypatch):
    import sam3ray.runner.job as job

    started = []
    monkeypatch.setattr(job, "init_ray", lambda cfg: started.append(cfg) or 0.0)
    missing = tmp_path / "tables" / "no-such-concepts.csv"
    path = _config(tmp_path, concepts=str(missing))
    assert main(["run", str(path)]) == exit_codes.BAD_CONFIG == 2
    err = capsys.readouterr().err
    assert "prompts.concepts" in err and str(missing) in err and str(path) in err
    assert "not found" in err
    assert not (tmp_path / "out").exists(), "nothing is created for a refused job"
    assert started == [], "refused before Ray starts"


def test_success_prints_the_summary(tmp_path, capsys, fake_run_job):
    calls = fake_run_job()
    path = _config(tmp_path)
    assert main(["run", str(path), "--set", "inference.conf=0.25"]) == exit_codes.OK == 0
    (cfg,) = calls
    assert cfg.inference.conf == 0.25 and cfg.source == str(path)
    out = capsys.readouterr().out
    assert "run 20260101T000000Z-abcdef: succeeded" in out
    assert "error not_an_image: 3" in out and "cat: 5" in out


def test_settings_changed_exits_4(tmp_path, capsys, fake_run_job):
    message = "3 committed shards were labelled with other settings"
    calls = fake_run_job(SettingsChanged(message))
    assert main(["run", str(_config(tmp_path))]) == exit_codes.SETTINGS_CHANGED == 4
    assert len(calls) == 1
    assert f"error: {message}" in capsys.readouterr().err


def test_job_failed_exits_3_with_the_report(tmp_path, capsys, fake_run_job):
    failure = "error rate 0.500 exceeds output.max_error_rate 0.1"
    fake_run_job(JobFailed(failure, _summary(failure=failure)))
    assert main(["run", str(_config(tmp_path))]) == exit_codes.ERROR_RATE == 3
    captured = capsys.readouterr()
    assert "run 20260101T000000Z-abcdef: failed" in captured.out
    assert "ok 4, errors 4" in captured.out and f"failure: {failure}" in captured.out
    assert f"FAILED: {failure}" in captured.err


def test_unexpected_exception_exits_1(tmp_path, capsys, fake_run_job):
    fake_run_job(RuntimeError("the cluster went away"))
    assert main(["run", str(_config(tmp_path))]) == exit_codes.CRASH == 1
    assert "CRASHED: RuntimeError: the cluster went away" in capsys.readouterr().err


def test_interrupt_exits_130(tmp_path, capsys, fake_run_job):
    fake_run_job(KeyboardInterrupt())
    assert main(["run", str(_config(tmp_path))]) == exit_codes.INTERRUPTED == 130
    assert "run again to resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (KeyboardInterrupt(), 130),
        (JobFailed("too many errors", {}), 3),
        (SettingsChanged("other settings"), 4),
        (ConfigError("bad"), 2),
        (PromptTableError("row 3: class_id"), 2),
        (InputError("nothing matched"), 2),
        (StorageError("no filesystem for foo://"), 2),
        (DecodeError("truncated", "cut short"), 1),  # an input's error, not the job's
        (RuntimeError("boom"), 1),
        (OSError("disk full"), 1),
    ],
)
def test_exit_code_for(exc, code):
    assert exit_codes.exit_code_for(exc) == code


def test_stats_on_a_missing_output_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-output-here"
    assert main(["stats", str(missing)]) == exit_codes.BAD_CONFIG == 2
    err = capsys.readouterr().err
    assert "no sam3ray output" in err and str(missing) in err
    assert not missing.exists(), "a typo must not create a stats folder"


def test_entry_points(tmp_path):
    """``python -m sam3ray.cli`` returns main's exit code; the console script is main."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["sam3ray"].partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is main
    done = subprocess.run(
        [sys.executable, "-m", "sam3ray.cli", "run", str(tmp_path / "absent.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "absent.yaml: cannot read" in done.stderr


def test_demo_refuses_a_folder_that_is_a_file(tmp_path, capsys):
    taken = tmp_path / "sam3ray-demo"
    taken.write_text("not a folder")
    assert main(["demo", "--out", str(taken)]) == exit_codes.BAD_CONFIG
    assert f"cannot use {taken} for the demo" in capsys.readouterr().err
