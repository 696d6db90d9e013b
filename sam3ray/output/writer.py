"""The writer: a shard's files, then its commit marker; run summaries; overwrite.

Detection files do NOT contain the ``class_id`` column: it lives in the Hive
directory name (and in the file's key-value metadata ``sam3ray.class_id``).
Keeping it in the file too breaks ``pandas.read_parquet(<detections dir>)``
(pyarrow's dictionary-typed partition field cannot merge with a string column),
and storing it dictionary-typed breaks ``pyarrow.dataset(partitioning="hive")``.
Every reader that understands Hive partitioning gets the column back.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sam3ray.output.layout import (
    CLEARED_BY_OVERWRITE,
    detections_path,
    images_path,
    marker_path,
    owned_by,
    run_summary_path,
    safe_name,
    validate_class_id,
)
from sam3ray.output.markers import Marker
from sam3ray.output.parquet import parquet_bytes
from sam3ray.output.schema import (
    DETECTIONS_REQUIRED,
    DETECTIONS_SCHEMA,
    IMAGES_REQUIRED,
    IMAGES_SCHEMA,
    check_shard_tables,
    utc_now,
    validate_table,
)
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

_DETECTION_ORDER = [
    ("image_id", "ascending"),
    ("frame_index", "ascending"),
    ("score", "descending"),
]


@dataclass(frozen=True)
class ShardOutput:
    """Everything one commit of a shard writes.

    ``previous_files`` are the files an earlier commit of this shard listed in its
    marker: those not rewritten now (a concept no longer found) are deleted, so
    readers never see rows the current commit did not produce.
    """

    shard_id: str
    members_hash: str
    settings_hash: str
    run_id: str
    detections: pa.Table
    images: pa.Table
    previous_files: tuple[str, ...] = ()

    @classmethod
    def rewrite(
        cls,
        marker: Marker,
        detections: pa.Table,
        images: pa.Table,
        members_hash: str | None = None,
    ) -> ShardOutput:
        """A new version of a committed shard (orphan trims, restitched videos): same
        run and settings, replacing the marker's files; same membership unless given."""
        return cls(
            shard_id=marker.shard_id,
            members_hash=marker.members_hash if members_hash is None else members_hash,
            settings_hash=marker.settings_hash,
            run_id=marker.run_id,
            detections=detections,
            images=images,
            previous_files=marker.files,
        )


class ShardWriter:
    """Writes one shard's files, then its commit marker (a small, picklable value)."""

    def __init__(self, output: Location) -> None:
        self.output = output

    def write(self, out: ShardOutput) -> Marker:
        """Validate, write detections per class, the images file, drop stale files, commit.

        Files of an attempt that died before its marker are known to nobody: they
        are overwritten if the redo finds the same concepts, else they stay
        (``output.mode: overwrite`` removes them); listing every class directory
        per shard to find them would cost too much on object stores.
        """
        shard_id = safe_name(out.shard_id, "shard_id")
        safe_name(out.run_id, "run_id")
        det = validate_table(out.detections, DETECTIONS_SCHEMA, DETECTIONS_REQUIRED, "detections")
        img = validate_table(out.images, IMAGES_SCHEMA, IMAGES_REQUIRED, "images")
        check_shard_tables(shard_id, out.run_id, det, img)
        class_ids = sorted(pc.unique(det.column("class_id")).to_pylist())
        for class_id in class_ids:
            validate_class_id(class_id)

        files: list[str] = []
        for class_id in class_ids:
            part = det.filter(pc.equal(det.column("class_id"), class_id)).sort_by(_DETECTION_ORDER)
            relpath = detections_path(class_id, shard_id)
            meta = {"sam3ray.class_id": class_id, "sam3ray.shard_id": shard_id}
            data = parquet_bytes(part.drop_columns(["class_id"]), meta)
            self.output.child(relpath).write_bytes(data)
            files.append(relpath)
        relpath = images_path(shard_id)
        img_sorted = img.sort_by([("image_id", "ascending"), ("frame_start", "ascending")])
        data = parquet_bytes(img_sorted, {"sam3ray.shard_id": shard_id})
        self.output.child(relpath).write_bytes(data)
        files.append(relpath)

        for old in out.previous_files:
            if old in files:
                continue
            if owned_by(old, shard_id):
                self.output.child(old).delete()
            else:
                logger.warning("marker of %s lists foreign file %r: not deleted", shard_id, old)

        statuses = Counter(img.column("status").to_pylist())
        marker = Marker(
            shard_id=shard_id,
            members_hash=out.members_hash,
            n_inputs=img.num_rows,
            n_ok=statuses.get("ok", 0),
            n_error=statuses.get("error", 0),
            n_detections=det.num_rows,
            run_id=out.run_id,
            files=tuple(files),
            written_at=utc_now().isoformat(),
            settings_hash=out.settings_hash,
        )
        self.output.child(marker_path(shard_id)).write_bytes(marker.to_json())
        return marker

    def delete_shard(self, marker: Marker) -> None:
        """Remove a shard's data files, then its marker (idempotent; used for orphans)."""
        safe_name(marker.shard_id, "shard_id")
        for relpath in marker.files:
            if owned_by(relpath, marker.shard_id):
                self.output.child(relpath).delete()
        self.output.child(marker_path(marker.shard_id)).delete()


def write_run_summary(output: Location, run_id: str, summary: dict[str, Any]) -> str:
    """Write ``runs/<run_id>.json`` atomically and return its URI."""
    loc = output.child(run_summary_path(run_id))
    loc.write_bytes(json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
    return loc.uri


def clear_output(output: Location) -> None:
    """Remove markers, detections, images and video state (not ``runs/``) for overwrite.

    Markers go first: if clearing is interrupted, no marker survives that
    vouches for data already deleted.
    """
    for sub in CLEARED_BY_OVERWRITE:
        if output.child(sub).delete_tree():
            logger.info("cleared %s/%s", output.uri.rstrip("/"), sub)
