"""``sam3ray plan CONFIG``: what a run would do, without doing it (no model is loaded).

It validates the job, lists the inputs and compares them and the settings with
what the output holds, then prints the inputs new / done / to relabel per
concept, the shards, and an estimate of GPU-hours. ``--json`` is for
schedulers; the exit code is the one ``sam3ray run`` would give before labelling
(0, 2 for a bad config, 4 when ``on_settings_change: refuse`` would stop it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sam3ray.cli import exit_codes


def _rate(cfg: Any) -> tuple[float | None, str]:
    """Images per second per GPU: configured, else the last run's measured rate here."""
    if cfg.plan.images_per_s_per_gpu:
        return cfg.plan.images_per_s_per_gpu, "plan.images_per_s_per_gpu"
    from sam3ray.analytics.scan import read_runs

    gpus = cfg.resources.gpus_per_actor
    try:
        runs = read_runs(cfg.output_location)
    except OSError:
        runs = []
    for run in reversed(runs):
        rate = (run.get("throughput") or {}).get("images_per_s_after_first_shard")
        actors = (run.get("actors") or {}).get("count") or 0
        if rate and actors:
            per = rate / (actors * gpus) if gpus else rate / actors
            unit = "GPU" if gpus else "CPU actor"
            return per, f"measured by run {run.get('run_id')} (per {unit})"
    return None, "unknown: set plan.images_per_s_per_gpu or run once"


def plan_report(cfg: Any) -> dict[str, Any]:
    """The dry-run plan of a job as JSON (the CLI's ``--json``)."""
    from sam3ray.core.errors import SettingsChanged
    from sam3ray.plan.job import prepare, refuse_changes
    from sam3ray.runner.job import make_plan

    prepared = prepare(cfg)
    plan = make_plan(cfg, prepared, write=False, refuse=False)
    stats = plan.stats
    names = {c.class_id: c.name for c in prepared.concepts}
    refused = None
    try:
        refuse_changes(cfg, stats)
    except SettingsChanged as exc:
        refused = str(exc)
    rate, source = _rate(cfg)
    to_label = stats.inputs_to_label
    return {
        "output": cfg.output.uri,
        "engine": plan.engine,
        **stats.to_json(),
        "concepts": {
            cid: {"name": names.get(cid, "(removed)"), **kinds}
            for cid, kinds in sorted(stats.by_concept.items())
        },
        "unfinished_runs": plan.recovered,
        "estimate": {
            "images_per_s_per_gpu": rate,
            "rate_from": source,
            "gpu_hours": round(to_label / rate / 3600, 3) if rate else None,
        },
        "refused": refused,
        "nothing_to_do": stats.tasks == 0,
    }


def _text(report: dict[str, Any]) -> str:
    i, sh, est = report["inputs"], report["shards"], report["estimate"]
    lines = [
        f"plan for {report['output']} ({report['engine']}):",
        f"  inputs: {i['listed']} listed, {i['done']} done, {i['new']} new "
        f"({i['new_images']} images, {i['new_videos']} videos)",
        f"  to label: {i['to_label']} inputs in {sh['new']} new shards; "
        f"to relabel: {i['to_relabel']} inputs in {sh['relabel']} shards; "
        f"{sh['drop_only']} shards only drop concepts",
    ]
    for cid, c in report["concepts"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in c.items() if k != "name")
        lines.append(f"    {c['name']} ({cid}): {kinds} inputs")
    if est["gpu_hours"] is not None:
        lines.append(
            f"  estimate: {est['gpu_hours']} GPU-hours at {est['images_per_s_per_gpu']:.2f} "
            f"images/s per GPU ({est['rate_from']})"
        )
    else:
        lines.append(f"  estimate: {est['rate_from']}")
    if report["unfinished_runs"]:
        lines.append(f"  unfinished runs (folded in by the next run): {report['unfinished_runs']}")
    if report["nothing_to_do"]:
        lines.append("  nothing to do: the output holds every listed input with these settings")
    if report["refused"]:
        lines.append(f"  REFUSED: {report['refused']}")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from sam3ray.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set or [])
        report = plan_report(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.exit_code_for(exc)
    print(json.dumps(report, indent=1, sort_keys=True) if args.json else _text(report))
    return exit_codes.SETTINGS_CHANGED if report["refused"] else exit_codes.OK


def register(subparsers: Any) -> None:
    """Add ``sam3ray plan`` to the CLI."""
    p = subparsers.add_parser("plan", help="what a run would do (dry run, no model loaded)")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    p.add_argument("--json", action="store_true", help="machine-readable, for schedulers")
    p.set_defaults(func=cmd_plan)
