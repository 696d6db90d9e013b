"""``sam3ray submit``: send a job to a remote Ray cluster through the Ray Jobs API.

The config is validated here first (no Ray is started locally), so a typo costs
seconds, not a GPU node. The cluster cannot see this machine's disk, so the
job ships as a Ray ``working_dir``: the config (``--set`` overrides applied) with
its local prompt tables copied next to it and re-pointed there. Object-store
paths travel as they are. Local input, checkpoint and output paths are refused
unless ``--allow-local-paths`` (a head on this machine, or a shared mount).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from sam3ray.config import ConfigError, JobConfig, is_hub_id, load_config
from sam3ray.config_checks import redact
from sam3ray.inputs import has_scheme

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
    header = f"# shipped by `sam3ray submit` from {cfg._source}; --set overrides applied\n"
    path = dest / JOB_CONFIG_NAME
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _check_tables(cfg: JobConfig) -> None:
    """Parse local prompt tables now: a bad class_id must fail before the upload."""
    from sam3ray.prompts import load_concepts, load_geometric

    opts = cfg.input.storage_options
    if not _is_local(cfg.prompts.concepts):
        return
    concepts = load_concepts(cfg.prompts.concepts, opts)
    if cfg.prompts.geometric and _is_local(cfg.prompts.geometric):
        load_geometric(cfg.prompts.geometric, concepts, opts)


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
        env["py_modules"] = [str(Path(__file__).resolve().parent)]
    return env


async def _follow(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait(client: Any, job_id: str) -> str:
    """Stream the job's logs until it ends; return its final status name."""
    import time

    try:
        asyncio.run(_follow(client, job_id))
    except RuntimeError as exc:  # log stream dropped: fall back to polling
        print(f"warning: log stream ended early ({exc}); polling status", file=sys.stderr)
    while (status := str(client.get_job_status(job_id).value)) not in _TERMINAL:
        time.sleep(2)
    return status


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.set or [])
        refused = local_paths(cfg)
        if refused and not args.allow_local_paths:
            raise ConfigError(
                f"{args.config}: these paths are on this machine and the cluster cannot "
                "read them:\n  " + "\n  ".join(refused) + "\nUse object storage (s3://…), "
                "or pass --allow-local-paths if the cluster shares this disk."
            )
        _check_tables(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if redact(cfg) != cfg.model_dump(mode="json"):
        print(
            "warning: the config holds credentials; they travel with the job to the "
            "cluster. Prefer env vars / instance roles on the cluster.",
            file=sys.stderr,
        )

    from ray.job_submission import JobSubmissionClient

    with tempfile.TemporaryDirectory(prefix="sam3ray-submit-") as tmp:
        try:
            job_yaml = build_working_dir(cfg, Path(tmp))
            load_config(job_yaml)  # what the cluster will parse must parse here too
        except (ConfigError, OSError) as exc:
            print(f"error: preparing the job's working_dir: {exc}", file=sys.stderr)
            return 2
        pip = args.runtime_env_pip
        entrypoint = ("python -m sam3ray.cli" if pip else "sam3ray") + f" run {JOB_CONFIG_NAME}"
        try:
            client = JobSubmissionClient(args.address)
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env_for(Path(tmp), pip),
                submission_id=args.job_id,
                metadata={"sam3ray_config": Path(args.config).name, "run_id": cfg.run_id or ""},
            )
        except Exception as exc:  # connection refused, auth, bad runtime_env: one line
            hint = ""
            if "auth" in str(exc).lower() and os.environ.get("RAY_AUTH_MODE") != "token":
                hint = " (token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN[_PATH])"
            print(f"error: submit to {args.address} failed: {exc}{hint}", file=sys.stderr)
            return 2
    print(job_id)
    if not args.wait:
        print(f"follow: ray job logs --address {args.address} --follow {job_id}", file=sys.stderr)
        return 0
    try:
        status = _wait(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running", file=sys.stderr)
        return 130
    message = (client.get_job_info(job_id).message or "").strip().split("\n", 1)[0]
    print(f"job {job_id}: {status} {message}".rstrip(), file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def register(subparsers: Any) -> None:
    """Add ``sam3ray submit`` to the CLI (found by sam3ray.cli)."""
    p = subparsers.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)")
    p.add_argument("config")
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        required=not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")),
        help="dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    p.add_argument("--wait", action="store_true", help="follow logs; exit 0 only if SUCCEEDED")
    p.add_argument(
        "--allow-local-paths",
        action="store_true",
        help="send local input/checkpoint/output paths as they are (cluster shares this disk)",
    )
    p.add_argument(
        "--runtime-env-pip",
        action="store_true",
        help="install sam3ray's dependencies via runtime_env pip (stock Ray image; slow)",
    )
    p.add_argument("--job-id", default=None, help="submission id (default: generated)")
    p.set_defaults(func=cmd_submit)
