"""Read an output back as whole tables (Hive partitioning gives ``class_id`` back)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds

from sam3ray.output.layout import DETECTIONS_DIR, IMAGES_DIR
from sam3ray.output.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from sam3ray.storage.location import Location

_PARTITIONING = ds.partitioning(pa.schema([("class_id", pa.string())]), flavor="hive")


def _dataset(output: Location, sub: str, schema: pa.Schema) -> ds.Dataset:
    folder = output.child(sub)
    folder.refresh()
    if not folder.exists():
        return ds.dataset([], schema=schema, format="parquet")
    return ds.dataset(
        folder.path,
        filesystem=folder.arrow_filesystem(),
        format="parquet",
        schema=schema,
        partitioning=_PARTITIONING if sub == DETECTIONS_DIR else None,
    )


def detections_dataset(output: Location) -> ds.Dataset:
    """All detections as one dataset (``class_id`` from the Hive directory names)."""
    return _dataset(output, DETECTIONS_DIR, DETECTIONS_SCHEMA)


def images_dataset(output: Location) -> ds.Dataset:
    """All images rows as one dataset."""
    return _dataset(output, IMAGES_DIR, IMAGES_SCHEMA)
