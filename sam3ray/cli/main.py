"""``sam3ray`` command line: run jobs, make the tiny checkpoint, prepare the demo.

Commands print for people (this is the one place ``print`` belongs) and return
the exit codes of :mod:`sam3ray.cli.exit_codes`; the work happens in the
library packages, imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sam3ray.cli import exit_codes

logger = logging.getLogger("sam3ray")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_config(path: str, overrides: list[str]) -> int:
    """Load, run and report one job; the exit code says how it ended."""
    from sam3ray.cli.report import summary_text
    from sam3ray.config import load_config
    from sam3ray.core.errors import ConfigError, JobFailed
    from sam3ray.runner.job import run_job

    try:
        cfg = load_config(path, overrides)
        summary = run_job(cfg)
    except JobFailed as exc:
        print(summary_text(exc.summary))
        print(f"FAILED: {exc}", file=sys.stderr)
        return exit_codes.ERROR_RATE
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.exit_code_for(exc)
    except KeyboardInterrupt:
        print("interrupted: committed shards are kept; run again to resume", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except Exception as exc:
        logger.exception("the job crashed")
        print(f"CRASHED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exit_codes.CRASH
    print(summary_text(summary))
    return exit_codes.OK


def cmd_run(args: argparse.Namespace) -> int:
    return run_config(args.config, args.set or [])


def cmd_make_tiny(args: argparse.Namespace) -> int:
    if args.video:
        from sam3ray.model.tiny_video import make_tiny_video_checkpoint

        path = make_tiny_video_checkpoint(args.out, seed=args.seed, resolution=args.resolution)
    else:
        from sam3ray.model.tiny import make_tiny_checkpoint

        path = make_tiny_checkpoint(args.out, seed=args.seed, resolution=args.resolution)
    print(f"tiny SAM 3 checkpoint written to {path}")
    return exit_codes.OK


def cmd_sample_data(args: argparse.Namespace) -> int:
    from sam3ray.demo.images import write_sample_images

    paths = write_sample_images(args.out, n_generated=args.generated)
    print(f"{len(paths)} sample images in {args.out}")
    return exit_codes.OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare the demo folder (once), run its job, and say where to look next."""
    from sam3ray.demo.prepare import DemoError, prepare_demo

    try:
        files = prepare_demo(args.out, n_generated=args.generated)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    code = run_config(str(files.config), args.set or [])
    if code == exit_codes.OK:
        labels, root = files.labels, files.root
        print(
            f"\nEverything is in {root}. Look next:\n"
            f"  sam3ray stats {labels}\n"
            f"  sam3ray preview {labels} --out {root / 'preview'}   "
            f"(then open {root / 'preview' / 'index.html'})\n"
            f"  sam3ray export labelstudio {labels} --out {root / 'labelstudio.json'} "
            f"--labeling-config {root / 'labelstudio.xml'} --local-files-root {root.parent}\n"
            f"  sam3ray run {files.config}   (the same job again; edit it first)"
        )
    return code


def build_parser() -> argparse.ArgumentParser:
    from sam3ray.cli import analytics, plan, submit

    p = argparse.ArgumentParser(prog="sam3ray", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pre-labelling job from a YAML config")
    run.add_argument("config")
    run.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. inference.conf=0.3"
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        help="label sample images with the tiny random-weight SAM 3, from any directory "
        "(everything goes under ./sam3ray-demo/)",
    )
    demo.add_argument(
        "--out", default="sam3ray-demo", help="the demo's folder (default: ./sam3ray-demo)"
    )
    demo.add_argument(
        "--generated", type=int, default=24, help="synthetic scenes besides the 10 photos"
    )
    demo.add_argument("--set", action="append", metavar="KEY=VALUE")
    demo.set_defaults(func=cmd_demo)

    tiny = sub.add_parser(
        "make-tiny-checkpoint", help="write a tiny random-weight SAM 3 checkpoint"
    )
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--resolution", type=int, default=336)
    tiny.add_argument(
        "--video",
        action="store_true",
        help="detector + tracker (serves video and image jobs alike)",
    )
    tiny.set_defaults(func=cmd_make_tiny)

    sample = sub.add_parser("sample-data", help="write the demo's sample photos and scenes")
    sample.add_argument("out")
    sample.add_argument("--generated", type=int, default=24)
    sample.set_defaults(func=cmd_sample_data)

    plan.register(sub)
    analytics.register(sub)
    submit.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)
