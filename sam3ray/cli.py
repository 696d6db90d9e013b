"""``sam3ray`` command line: run jobs, make the tiny checkpoint, prepare the demo.

Commands print for people (this is the one place ``print`` belongs); the work
happens in the library modules.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("sam3ray")

DEMO_CONFIG = "configs/local-demo.yaml"
DEMO_CHECKPOINT = "artifacts/sam3-tiny.pt"
DEMO_IMAGES = "artifacts/sample-images"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from sam3ray.config import ConfigError, load_config
    from sam3ray.pipeline import JobFailed, run_job
    from sam3ray.summary import summary_text

    try:
        cfg = load_config(args.config, args.set or [])
        summary = run_job(cfg)
    except JobFailed as exc:
        print(summary_text(exc.summary))
        print(f"FAILED: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(summary))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    if args.video:
        from sam3ray.model.tiny_video import make_tiny_video_checkpoint

        path = make_tiny_video_checkpoint(args.out, seed=args.seed, resolution=args.resolution)
    else:
        from sam3ray.model.tiny import make_tiny_checkpoint

        path = make_tiny_checkpoint(args.out, seed=args.seed, resolution=args.resolution)
    print(f"tiny SAM 3 checkpoint written to {path}")
    return 0


def cmd_sample_data(args: argparse.Namespace) -> int:
    from sam3ray.sample_data import write_sample_images

    paths = write_sample_images(args.out, n_generated=args.generated)
    print(f"{len(paths)} sample images in {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare what configs/local-demo.yaml needs (once), then run it."""
    from sam3ray.model.tiny import make_tiny_checkpoint
    from sam3ray.sample_data import write_sample_images

    if not Path(DEMO_CONFIG).is_file():
        print(
            f"error: run the demo from the repository root ({DEMO_CONFIG} not found)",
            file=sys.stderr,
        )
        return 2
    if not Path(DEMO_CHECKPOINT).is_file():
        make_tiny_checkpoint(DEMO_CHECKPOINT, seed=0)
    if not Path(DEMO_IMAGES).is_dir():
        write_sample_images(DEMO_IMAGES)
    args.config = DEMO_CONFIG
    code = cmd_run(args)
    if code == 0:
        print(
            "\nLook at the labels: sam3ray stats out/local-demo; "
            "sam3ray preview out/local-demo --out out/local-demo-preview"
        )
    return code


def build_parser() -> argparse.ArgumentParser:
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
        "demo", help="run configs/local-demo.yaml (creates the tiny model and images)"
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

    for register in _extensions():
        register(sub)
    return p


def _extensions():
    """Subcommands that live in their own modules (stats, export, preview, submit)."""
    import importlib

    found = []
    for name in ("sam3ray.analytics.cli", "sam3ray.submit"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
            continue
        found.append(module.register)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
