"""``sam3ray stats | export coco | export labelstudio | preview``: looking at the labels.

The commands only parse arguments and print; the work lives in
``sam3ray.analytics``, which ``jobs/aggregate.py`` calls too. Heavy imports
happen inside the commands so that ``sam3ray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sam3ray.cli import exit_codes


def storage_options(items: list[str] | None) -> dict[str, Any]:
    """``--storage-option k=v`` flags as a dict: dotted keys nest
    (``client_kwargs.endpoint_url=http://...``), values are parsed as YAML."""
    from sam3ray.config import apply_overrides

    return apply_overrides({}, items or [])


def locations(args: argparse.Namespace, *uris: str | None) -> list[Any]:
    """The output and each of ``uris`` as ``Location``s with the ``--storage-option``s."""
    from sam3ray.storage.location import Location

    opts = storage_options(args.storage_option)
    return [Location(u, opts) if u is not None else None for u in (args.output, *uris)]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="output URI of a job (local path, s3://bucket/prefix, ...)")
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec option for the output and the images, e.g. anon=true or "
        "client_kwargs.endpoint_url=http://127.0.0.1:9000 (repeatable)",
    )


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", nargs="+", metavar="NAME_OR_UUID", help="only these concepts")
    p.add_argument("--min-score", type=float, default=None, help="drop detections below this")


def cmd_stats(args: argparse.Namespace) -> int:
    from sam3ray.analytics.stats import compute_stats, format_table

    (output,) = locations(args)
    stats = compute_stats(output, approx=args.approx, write=args.save)
    print(format_table(stats.concepts, [c for c in stats.concepts.column_names if c != "class_id"]))
    print()
    print(format_table(stats.runs))
    if args.save:
        print(f"\nwritten: {stats.concepts_uri}\n         {stats.runs_uri}")
    return 0


def cmd_coco(args: argparse.Namespace) -> int:
    from sam3ray.analytics.coco import export_coco

    output, out, results = locations(args, args.out, args.results)
    done = export_coco(output, out, concepts=args.concepts, min_score=args.min_score,
                       results=results)  # fmt: skip
    print(f"COCO: {done.images} images, {done.annotations} annotations, "
          f"{done.categories} categories -> {done.path}")  # fmt: skip
    if done.results_path:
        print(f"results (COCO.loadRes list) -> {done.results_path}")
    return 0


def cmd_labelstudio(args: argparse.Namespace) -> int:
    from sam3ray.analytics import categories, select_categories
    from sam3ray.analytics.labelstudio import (
        PolygonOptions,
        export_labelstudio,
        labeling_config,
    )

    output, out = locations(args, args.out)
    knobs = ("tolerance", "max_points", "min_part_px", "max_parts")
    polygons = PolygonOptions(**{k: getattr(args, k) for k in knobs if hasattr(args, k)})
    done = export_labelstudio(output, out, fmt=args.format,
                              concepts=args.concepts, min_score=args.min_score,
                              from_name=args.from_name, to_name=args.to_name,
                              local_files_root=args.local_files_root, presign=args.presign,
                              polygons=polygons)  # fmt: skip
    empty = f" ({done.empty} with an empty mask, not drawn)" if done.empty else ""
    print(f"Label Studio: {done.tasks} tasks, {done.predictions} predictions, "
          f"{done.detections} detections{empty} as {done.results} regions "
          f"-> {done.path}")  # fmt: skip
    if done.loss is not None:
        print(f"polygons: {done.loss.describe()}")
    if done.storage_path:
        print(f"images: add a Local Files storage on {done.storage_path} to the project "
              "(Label Studio started with LOCAL_FILES_SERVING_ENABLED=true and "
              f"LOCAL_FILES_DOCUMENT_ROOT={args.local_files_root})")  # fmt: skip
    if done.buckets and not args.presign:
        print(
            f"images: add a cloud storage of bucket(s) {', '.join(done.buckets)} to the "
            "project (it resolves the s3:// / gs:// URLs), or export with --presign"
        )
    if args.labeling_config:
        cats = select_categories(categories(output), args.concepts)
        xml = labeling_config(cats, args.format, args.from_name, args.to_name)
        with open(args.labeling_config, "w", encoding="utf-8") as f:
            f.write(xml)
        print(f"labelling config -> {args.labeling_config}")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from sam3ray.analytics.preview import render_preview

    output, out = locations(args, args.out)
    done = render_preview(output, out, per_concept=args.per_concept, max_side=args.max_side,
                          concepts=args.concepts)  # fmt: skip
    extra = f" ({done.failed} unreadable)" if done.failed else ""
    print(f"preview: {done.thumbnails} thumbnails{extra} -> {done.index}")
    return 0


def _guard(func: Any) -> Any:
    """Turn the errors a user can fix (unknown concept, missing output, a write the
    credentials do not allow) into exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exit_codes.BAD_CONFIG
        except PermissionError as exc:  # e.g. --save or --out on a read-only lake
            print(f"error: not allowed to write (read-only credentials?): {exc}", file=sys.stderr)
            return exit_codes.BAD_CONFIG

    return run


def register(subparsers: Any) -> None:
    """Add ``stats``, ``export {coco,labelstudio}`` and ``preview`` to the ``sam3ray`` CLI."""
    stats = subparsers.add_parser("stats", help="per-concept and per-run statistics")
    _add_common(stats)
    stats.add_argument("--approx", action="store_true", help="t-digest percentiles (huge outputs)")
    stats.add_argument(
        "--save",
        action="store_true",
        help="also write <output>/stats/{concepts,runs}.parquet (without it nothing is written)",
    )
    stats.set_defaults(func=_guard(cmd_stats))

    export = subparsers.add_parser("export", help="export the labels (COCO, Label Studio)")
    formats = export.add_subparsers(dest="export_format", required=True)
    coco = formats.add_parser("coco", help="COCO instances JSON (RLE masks)")
    _add_common(coco)
    coco.add_argument("--out", required=True, help="JSON file to write (any fsspec URI)")
    coco.add_argument("--results", help="also write the COCO.loadRes list form to this file")
    _add_filters(coco)
    coco.set_defaults(func=_guard(cmd_coco))

    ls = formats.add_parser("labelstudio", help="Label Studio pre-annotated tasks")
    _add_common(ls)
    ls.add_argument("--out", required=True, help="JSON file to write (any fsspec URI)")
    ls.add_argument("--format", choices=("rle", "polygon"), default="rle")
    ls.add_argument("--from-name", default="label", help="name of the labels tag")
    ls.add_argument("--to-name", default="image", help="name of the Image tag")
    ls.add_argument("--labeling-config", metavar="FILE", help="also write a matching XML config")
    # Both URL flags may apply at once: each image URI is turned into a URL by its own
    # kind (local files vs object store), and a lake can hold both.
    ls.add_argument(
        "--local-files-root",
        metavar="DIR",
        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: local images become "
        "/data/local-files/?d=<path under DIR> URLs",
    )
    ls.add_argument(
        "--presign",
        type=int,
        metavar="SECONDS",
        help="object-store images become presigned HTTPS URLs valid this long "
        "(default: s3:// / gs:// URLs for a cloud storage of the project)",
    )
    # Polygon knobs: defaults live in PolygonOptions (not imported here: --help stays fast).
    polygon = [("--tolerance", float, "simplification tolerance in pixels (outer contours "
                "only; default 1)"),
               ("--max-points", int, "most vertices per region; the tolerance doubles until "
                "met (default 256)"),
               ("--min-part-px", int, "leave out parts of a mask smaller than this, reported "
                "(default 16)"),
               ("--max-parts", int, "most regions per detection, largest parts first, the "
                "rest reported (default 16)")]  # fmt: skip
    for flag, kind, text in polygon:
        ls.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"polygons: {text}")
    _add_filters(ls)
    ls.set_defaults(func=_guard(cmd_labelstudio))

    preview = subparsers.add_parser("preview", help="static HTML gallery of sample masks")
    _add_common(preview)
    preview.add_argument("--out", required=True, help="directory for index.html and images")
    preview.add_argument("--per-concept", type=int, default=6, help="sample images per concept")
    preview.add_argument("--max-side", type=int, default=512, help="thumbnail size in pixels")
    preview.add_argument("--concepts", nargs="+", metavar="NAME_OR_UUID")
    preview.set_defaults(func=_guard(cmd_preview))
