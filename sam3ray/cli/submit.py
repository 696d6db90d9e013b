"""``sam3ray submit``: send a job to a remote Ray cluster through the Ray Jobs API.

The config is validated here first (no Ray is started locally), so a typo costs
seconds, not a GPU node. With ``--wait`` the command follows the job's logs and
exits with the job's own exit code (``cli.exit_codes``), so a scheduler sees
"bad config", "error rate" and "crash" apart; 5 means the submit itself failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from sam3ray.cli import exit_codes


def _stdout(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    from sam3ray.config import ConfigError, load_config, redact
    from sam3ray.runner import submit

    try:
        cfg = load_config(args.config, args.set or [])
        refused = submit.local_paths(cfg)
        if refused and not args.allow_local_paths:
            raise ConfigError(
                f"{args.config}: these paths are on this machine and the cluster cannot "
                "read them:\n  " + "\n  ".join(refused) + "\nUse object storage (s3://…), "
                "or pass --allow-local-paths if the cluster shares this disk."
            )
        submit.check_tables(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    if redact(cfg) != cfg.model_dump(mode="json"):
        _warn(
            "the config holds credentials; they travel with the job to the cluster. "
            "Prefer env vars / instance roles on the cluster."
        )
    with tempfile.TemporaryDirectory(prefix="sam3ray-submit-") as tmp:
        try:
            job_yaml = submit.build_working_dir(cfg, Path(tmp))
            load_config(job_yaml)  # what the cluster will parse must parse here too
        except (ConfigError, OSError) as exc:
            print(f"error: preparing the job's working_dir: {exc}", file=sys.stderr)
            return exit_codes.BAD_CONFIG
        try:
            client, job_id = submit.submit(
                cfg, Path(tmp), args.address, pip=args.runtime_env_pip, job_id=args.job_id
            )
        except Exception as exc:  # connection refused, auth, bad runtime_env: one line
            hint = ""
            if "auth" in str(exc).lower() and os.environ.get("RAY_AUTH_MODE") != "token":
                hint = " (token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN[_PATH])"
            print(f"error: submit to {args.address} failed: {exc}{hint}", file=sys.stderr)
            return exit_codes.SUBMIT_FAILED
    print(job_id)
    if not args.wait:
        print(f"follow: ray job logs --address {args.address} --follow {job_id}", file=sys.stderr)
        return exit_codes.OK
    try:
        end = submit.wait(client, job_id, _stdout, _warn)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running", file=sys.stderr)
        return exit_codes.INTERRUPTED
    print(f"job {job_id}: {end.status} {end.message}".rstrip(), file=sys.stderr)
    if end.status == "SUCCEEDED":
        return exit_codes.OK
    if end.exit_code in (exit_codes.BAD_CONFIG, exit_codes.ERROR_RATE, exit_codes.SETTINGS_CHANGED):
        return end.exit_code
    return exit_codes.CRASH


def register(subparsers: Any) -> None:
    """Add ``sam3ray submit`` to the CLI."""
    default = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    p = subparsers.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)")
    p.add_argument("config")
    p.add_argument(
        "--address",
        default=default,
        required=not default,
        help="dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    p.add_argument(
        "--wait", action="store_true", help="follow logs; exit with the job's own exit code"
    )
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
