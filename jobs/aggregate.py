"""After a run: stats, COCO and Label Studio exports (and optionally the preview gallery).

A thin script for scheduled pipelines (a cron RayJob step, Airflow, ...): all
the work is in ``sam3ray.analytics``; this only chains it and names the files.

    python jobs/aggregate.py s3://bucket/labels/ --out-dir s3://bucket/labels/exports \\
        --preview --storage-option client_kwargs.endpoint_url=http://minio:9000

Writes ``<OUTPUT>/stats/{concepts,runs}.parquet`` and, under ``--out-dir``
(default ``<OUTPUT>/exports``): ``coco.json``, ``coco_results.json`` (the
``COCO.loadRes`` list), ``labelstudio.json`` and, with ``--preview``,
``preview/index.html``. Exit code 0 on success, 2 when the output is missing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sam3ray.analytics.coco import export_coco
from sam3ray.analytics.labelstudio import export_labelstudio
from sam3ray.analytics.stats import compute_stats
from sam3ray.cli.analytics import storage_options
from sam3ray.storage.location import Location

logger = logging.getLogger("sam3ray.jobs.aggregate")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", help="output URI of the job")
    p.add_argument("--out-dir", help="where the exports go (default: <OUTPUT>/exports)")
    p.add_argument("--preview", action="store_true", help="also render the HTML gallery")
    p.add_argument("--per-concept", type=int, default=6, help="preview images per concept")
    p.add_argument("--min-score", type=float, default=None, help="export threshold")
    p.add_argument("--labelstudio-format", choices=("rle", "polygon"), default="rle")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    opts = storage_options(args.storage_option)
    output = Location(args.output, opts)
    out_dir = Location(args.out_dir, opts) if args.out_dir else output.child("exports")
    try:
        stats = compute_stats(output, write=True)  # this script's job: stats next to the output
    except FileNotFoundError as exc:
        logger.error("%s", exc)
        return 2
    total = sum(stats.concepts.column("detections").to_pylist())
    logger.info("%d concepts, %d detections, %d runs", stats.concepts.num_rows, total,
                stats.runs.num_rows)  # fmt: skip
    export_coco(output, out_dir.child("coco.json"), min_score=args.min_score,
                results=out_dir.child("coco_results.json"))  # fmt: skip
    export_labelstudio(output, out_dir.child("labelstudio.json"),
                       fmt=args.labelstudio_format, min_score=args.min_score)  # fmt: skip
    if args.preview:
        from sam3ray.analytics.preview import render_preview

        render_preview(output, out_dir.child("preview"), per_concept=args.per_concept)
    logger.info("aggregate done: %s", out_dir.uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
