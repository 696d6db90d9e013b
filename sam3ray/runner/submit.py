"""``sam3ray submit``: send a job to a remote Ray cluster through the Ray Jobs API.

The config is validated here first (no Ray is started locally), so a typo costs
seconds, not a GPU node. The cluster cannot see this machine's disk, so the
job ships as a Ray ``working_dir``: the config (``--set`` overrides applied) with
its local prompt tables copied next to it and re-pointed there. Object-store
paths travel as they are. Local input, checkpoint and output paths are refused
unless ``--allow-local-paths`` (a head on this machine, or a shared mount).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.job_submission import JobSubmissionClient

from sam3ray.config.schema import JobConfig, is_hub_id
from sam3ray.core.uri import has_scheme
from sam3ray.sources.prompts import load_concepts, load_geometric

JOB_CONFIG_NAME = "job.yaml"
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _is_local(uri: str | None) -> bool:
    return bool(uri) and (not has_scheme(uri) or uri.startswith("file://"))


def local_paths(cfg: JobConfig) -> list[str]:
    """``field: path`` for every local source/destination the cluster cannot see."""
    found = [f"input.uris[{i}]: {u}" for i, u in enumerate(cfg.input.uris) if _is_local(u)]
    if _is_local(cfg.input.manifest):
        found.append(f"input.manifest: {cfg.input.manifest}")
    ckpt = cfg.model.checkpoint
    if _is_local(ckpt) and not (is_hub_id(ckpt) and not os.path.exists(ckpt)):
        found.append(f"model.checkpoint: {ckpt}")
    if _is_local(cfg.output.uri):
        found.append(f"output.uri: {cfg.output.uri}")
    return found


def build_working_dir(cfg: JobConfig, dest: Path) -> Path:
    """Write ``dest/job.yaml`` plus the local prompt tables; return the config path.

    Only fields the user set are written (``exclude_unset``), so a cluster image
    with an older sam3ray does not trip over defaults it does not know.
    """
    data: dict[str, Any] = cfg.model_dump(mode="json", exclude_unset=True)
    prompts = data.setdefault("prompts", {})
    for key in ("concepts", "geometric"):
        src = getattr(cfg.prompts, key)
        if _is_local(src):
            src = src.removeprefix("file://")
            name = f"{key}{Path(src).suffix.lower()}"
            shutil.copyfile(src, dest / name)
            prompts[key] = name  # relative: the job runs with the working_dir as cwd
    header = f"# shipped by `sam3ray submit` from {cfg.source}; --set overrides applied\n"
    path = dest / JOB_CONFIG_NAME
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def check_tables(cfg: JobConfig) -> None:
    """Parse local prompt tables now: a bad class_id must fail before the upload."""
    if not _is_local(cfg.prompts.concepts):
        return
    concepts = load_concepts(cfg.input.location(cfg.prompts.concepts))
    if cfg.prompts.geometric and _is_local(cfg.prompts.geometric):
        load_geometric(cfg.input.location(cfg.prompts.geometric), concepts)


def runtime_env_for(working_dir: Path, pip: bool) -> dict[str, Any]:
    """The job's runtime_env; with ``pip``, sam3ray's dependencies are installed there
    (for a stock Ray image) and the local sam3ray package ships as a py_module."""
    env: dict[str, Any] = {"working_dir": str(working_dir)}
    if pip:
        from importlib.metadata import requires

        from packaging.requirements import Requirement

        pkgs = []
        for spec in requires("sam3ray") or []:
            req = Requirement(spec)
            if req.name.lower() != "ray" and not (req.marker and "extra" in str(req.marker)):
                pkgs.append(spec)
        env["pip"] = {"packages": pkgs, "pip_check": False}
        env["py_modules"] = [str(Path(__file__).resolve().parents[1])]
    return env


def submit(
    cfg: JobConfig, working_dir: Path, address: str, *, pip: bool, job_id: str | None = None
) -> tuple[JobSubmissionClient, str]:
    """Submit ``sam3ray run job.yaml`` with ``working_dir``; (client, submission id)."""
    entrypoint = ("python -m sam3ray.cli" if pip else "sam3ray") + f" run {JOB_CONFIG_NAME}"
    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env_for(working_dir, pip),
        submission_id=job_id,
        metadata={
            "sam3ray_config": Path(cfg.source or JOB_CONFIG_NAME).name,
            "run_id": cfg.run_id or "",
        },
    )
    return client, job_id


@dataclass(frozen=True)
class JobEnd:
    """How a submitted job ended: Ray's status, the driver's exit code, its message."""

    status: str
    exit_code: int | None
    message: str


async def _follow(client: Any, job_id: str, on_log: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        on_log(chunk)


def wait(
    client: JobSubmissionClient,
    job_id: str,
    on_log: Callable[[str], None],
    on_warning: Callable[[str], None],
) -> JobEnd:
    """Stream the job's logs to ``on_log`` until it ends; how it ended."""
    try:
        asyncio.run(_follow(client, job_id, on_log))
    except RuntimeError as exc:  # log stream dropped: fall back to polling
        on_warning(f"log stream ended early ({exc}); polling status")
    while (status := str(client.get_job_status(job_id).value)) not in _TERMINAL:
        time.sleep(2)
    info = client.get_job_info(job_id)
    message = (info.message or "").strip().split("\n", 1)[0]
    return JobEnd(status, getattr(info, "driver_exit_code", None), message)
