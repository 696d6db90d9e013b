"""An output built by hand, the way a run builds it, without Ray or a model.

A :class:`Lake` is a manifest of hash-named inputs (the layout of content-addressed
lakes; the files need not exist: listing never opens them), a concept table, a
checkpoint file that planning only checks for existence, and an output folder.
:func:`run_locally` is a run without Ray: ``plan.job.prepare``, then
``plan.local.plan_locally``, the plan written first, every task "labelled" by
:func:`fake_result` (deterministic detections, no inference) and committed by the
real ``stages.commit.CommitStage``, then ``plan.local.consolidate_locally``.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3ray.config import JobConfig
from sam3ray.core.shards import ShardTask
from sam3ray.core.types import Detection
from sam3ray.plan.buckets import PlanStats
from sam3ray.plan.job import prepare
from sam3ray.plan.local import consolidate_locally, plan_locally, write_plan
from sam3ray.stages.commit import CommitStage
from sam3ray.stages.rows import InputInfo, detection_rows, input_row, tables
from sam3ray.stages.tasks import ShardResult, WorkerInfo
from tests.support.jobs import CONCEPTS_CSV, job_dict

#: A fourth concept, for "add a concept".
DOG = "5d3c2b1a-0f9e-4d8c-b7a6-958473625140"
DOG_ROW = f"{DOG},dog,dog,\n"
MODEL = "fake-model@00000000"


def hash_names(n: int, seed: int, prefix: str = "s3://lake/raw/") -> list[str]:
    """``n`` hash-named URIs (random hex, like content-addressed keys)."""
    rng = random.Random(seed)
    return [f"{prefix}{rng.getrandbits(128):032x}.jpg" for _ in range(n)]


def n_found(image_id: str, class_id: str, version: int) -> int:
    """How many detections the fake model finds (0-2, deterministic)."""
    return hashlib.sha1(f"{image_id}|{class_id}|{version}".encode()).digest()[0] % 3


def fake_result(
    task: ShardTask,
    run_id: str,
    names: dict[str, str],
    *,
    errors: Collection[str] = (),
    version: int = 0,
) -> ShardResult:
    """What decode + segment would hand the commit stage for ``task``: rows for the
    concepts labelled now (none for a drop-only task, which decodes nothing); inputs
    in ``errors`` end in error (``not_found``). ``version`` changes the scores."""
    det_rows: list[dict[str, Any]] = []
    img_rows: list[dict[str, Any]] = []
    if task.concepts:
        for ref in task.shard.refs:
            info = InputInfo(run_id, ref.image_id, ref.uri, 64, 48, MODEL)
            if ref.uri in errors:
                img_rows.append(
                    input_row(
                        info,
                        task.shard_id,
                        status="error",
                        n_detections=0,
                        decode_ms=1.0,
                        infer_ms=0.0,
                        error="FileNotFoundError: gone",
                        error_reason="not_found",
                    )
                )
                continue
            found = []
            for cid in task.concepts:
                for k in range(n_found(ref.image_id, cid, version)):
                    score = round(0.5 + 0.1 * k + 0.01 * version, 4)
                    mask = f"{cid[:4]}{k}{version}".encode()
                    found.append(
                        Detection(cid, names[cid], f'text:"{names[cid]}"', score,
                                  (1.0, 2.0, 30.0, 40.0), mask, (48, 64), 100 + k)
                    )  # fmt: skip
            det_rows += detection_rows(info, found)
            img_rows.append(
                input_row(
                    info,
                    task.shard_id,
                    status="ok",
                    n_detections=len(found),
                    decode_ms=1.0,
                    infer_ms=2.0,
                )
            )
    det, img = tables(det_rows, img_rows)
    worker = WorkerInfo(os.getpid(), time.time(), 0.0, MODEL)
    return ShardResult(task, det, img, worker, time.time())


@dataclass
class Lake:
    """A manifest of hash-named inputs, a concept table, a checkpoint stub, an output."""

    root: Path
    n: int = 200
    shard_size: int = 16
    seed: int = 0
    uris: list[str] = field(default_factory=list)
    concepts_csv: str = CONCEPTS_CSV
    _runs: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.uris = hash_names(self.n, self.seed)
        (self.root / "sam3.pt").write_bytes(b"never loaded by planning")
        self.write()

    @property
    def output(self) -> Path:
        return self.root / "labels"

    def write(self) -> None:
        (self.root / "manifest.txt").write_text("\n".join(self.uris) + "\n")
        (self.root / "concepts.csv").write_text(self.concepts_csv)

    def add_inputs(self, n: int, seed: int) -> list[str]:
        new = hash_names(n, seed)
        self.uris += new
        self.write()
        return new

    def set_concepts(self, text: str) -> None:
        self.concepts_csv = text
        self.write()

    def next_run_id(self) -> str:
        """Run ids sort by start time (the state's "latest row" relies on it)."""
        self._runs += 1
        return f"20260101T{self._runs:06d}Z-run{self._runs:03d}"

    def dict(self, plan: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """The job as plain data (``tests.support.jobs.job_dict`` arguments override;
        ``plan`` is the ``plan:`` section)."""
        args: dict[str, Any] = {
            "concepts": str(self.root / "concepts.csv"),
            "checkpoint": str(self.root / "sam3.pt"),
            "output": str(self.output),
            "manifest": str(self.root / "manifest.txt"),
            "shard_size": self.shard_size,
        }
        args.update(kw)
        if "run_id" not in args:
            args["run_id"] = self.next_run_id()
        data = job_dict(**args)
        if plan is not None:
            data["plan"] = plan
        return data

    def config(self, **kw: Any) -> JobConfig:
        return JobConfig.model_validate(self.dict(**kw))


@dataclass
class LocalRun:
    run_id: str
    tasks: list[ShardTask]
    stats: PlanStats
    committed: list[str]
    state: dict[str, Any] | None


def run_locally(
    cfg: JobConfig,
    *,
    skip: Iterable[str] = (),
    errors: Collection[str] = (),
    version: int = 0,
    consolidate: bool = True,
) -> LocalRun:
    """One run without Ray: plan, write the plan, commit every task but those in ``skip``
    (shard ids: they "die" before their commit), consolidate (unless the run "dies")."""
    prepared = prepare(cfg)
    tasks, stats = plan_locally(cfg, prepared)
    out = cfg.output_location
    names = {c.class_id: c.name for c in prepared.concepts}
    skip = set(skip)
    done = []
    state = None
    if tasks:
        write_plan(out, prepared.run_id, tasks)
        stage = CommitStage(out, prepared.run_id)
        for task in tasks:
            if task.shard_id in skip:
                continue
            stage.process(fake_result(task, prepared.run_id, names, errors=errors, version=version))
            done.append(task.shard_id)
        if consolidate:
            state = consolidate_locally(out, prepared.run_id, cfg.plan.local_max_inputs)
    return LocalRun(prepared.run_id, tasks, stats, done, state)
