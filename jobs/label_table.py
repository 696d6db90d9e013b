"""Label a Parquet table of image URIs inside a Ray Data pipeline (``sam3ray.label``).

The table is the user's own (say ``asset_id, uri, split``); the labels are the
job's detection rows plus the key columns named by ``--keep``, written with
Ray Data's own ``write_parquet(partition_cols=["class_id"])``. Inputs that
cannot be labelled are rows with ``status = "error"`` in
``class_id=__HIVE_DEFAULT_PARTITION__/`` (a null ``class_id`` when read back).
Model, inference and resources come from a job config's sections, and its
``input.storage_options`` and ``input.max_pixels`` read the table, the images
and the concept table. Text concepts only: a config with ``prompts.geometric``
(box/point exemplars) is refused (``ConfigError``), as the operator has none:

    python jobs/label_table.py images.parquet out/table-labels \\
        --config configs/local-demo.yaml --column uri --keep asset_id

Between reading and labelling is where a pipeline filters, deduplicates or
samples (``--only split=train`` shows one such step).
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("sam3ray.jobs.label_table")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", help="Parquet file or folder of the image table (any fsspec URI)")
    p.add_argument("out", help="output folder for the labels (Parquet, class_id=<uuid>/)")
    p.add_argument("--config", required=True, help="job config whose sections to use")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    p.add_argument("--column", default="uri", help="the column with the images")
    p.add_argument("--kind", choices=("uri", "bytes", "array"), default="uri")
    p.add_argument("--keep", nargs="*", default=[], help="key columns to carry into the labels")
    p.add_argument("--only", metavar="COLUMN=VALUE", help="label only rows where a string column "
                   "has this value, e.g. split=train")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Read the table, label it, write the labels; returns the process exit code."""
    import ray

    import sam3ray
    from sam3ray.config import ConfigError, load_config
    from sam3ray.storage.location import Location

    args = parse_args(argv)
    cfg = load_config(args.config, args.set or [])
    if cfg.prompts.geometric:  # else its exemplar-only concepts would silently get no labels
        raise ConfigError(
            f"prompts.geometric: {cfg.prompts.geometric}: sam3ray.label takes text concepts "
            "only; label box/point exemplars with the job (sam3ray run), or remove "
            "prompts.geometric (--set prompts.geometric=null)"
        )
    opts = cfg.input.storage_options
    if not ray.is_initialized():
        ray.init(address=cfg.resources.ray_address)
    source = Location(args.table, opts)
    ds = ray.data.read_parquet(source.path, filesystem=source.arrow_filesystem())
    if args.only:
        from ray.data.expressions import col

        name, _, value = args.only.partition("=")
        ds = ds.filter(expr=col(name) == value)
    labels = sam3ray.label(
        ds,
        column=args.column,
        kind=args.kind,
        concepts=cfg.prompts.concepts,
        model=cfg.model,
        inference=cfg.inference,
        resources=cfg.resources,
        keep=args.keep,
        storage_options=opts,
        max_pixels=cfg.input.max_pixels,
    )
    out = Location(args.out, cfg.output.storage_options or opts)
    labels.write_parquet(out.path, filesystem=out.arrow_filesystem(), partition_cols=["class_id"])
    logger.info("labels of %s written to %s", args.table, out.uri)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
