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

    ``detections`` hold the concepts labelled now; ``images`` every input of the
    shard (with ``n_detections`` over all the concepts it holds after the commit).
    ``previous_files`` are files an earlier commit may have left for the concepts
    labelled or dropped now: those not rewritten are deleted, so readers never see
    rows the current commit did not produce; other concepts' files stay as they are.
    ``commit_key`` (``output.state.commit_key``) is written last, after the marker.
    """

    shard_id: str
    run_id: str
    detections: pa.Table
    images: pa.Table
    prints: tuple[tuple[str, str], ...] = ()
    previous_files: tuple[str, ...] = ()
    kept_files: tuple[str, ...] = ()  # other concepts' files, listed in the marker as is
    commit_key: str | None = None

    @classmethod
    def rewrite(cls, marker: Marker, detections: pa.Table, images: pa.Table) -> ShardOutput:
        """A new version of a committed shard (restitched video ids): same run and
        fingerprints, replacing the marker's files."""
        return cls(
            shard_id=marker.shard_id,
            run_id=marker.run_id,
            detections=detections,
            images=images,
            prints=marker.prints,
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

        files += [f for f in out.kept_files if f not in files]
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
            n_inputs=img.num_rows,
            n_ok=statuses.get("ok", 0),
            n_error=statuses.get("error", 0),
            n_detections=sum(n or 0 for n in img.column("n_detections").to_pylist()),
            run_id=out.run_id,
            files=tuple(files),
            written_at=utc_now().isoformat(),
            prints=out.prints,
        )
        self.output.child(marker_path(shard_id)).write_bytes(marker.to_json())
        if out.commit_key is not None:  # last: the run's consolidation lists these keys
            self.output.child(out.commit_key).write_bytes(b"{}")
        return marker


def write_run_summary(output: Location, run_id: str, summary: dict[str, Any]) -> str:
    """Write ``runs/<run_id>.json`` atomically and return its URI."""
    loc = output.child(run_summary_path(run_id))
    loc.write_bytes(json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
    return loc.uri


def clear_output(output: Location, keep: str | None = None) -> None:
    """Remove the labels and the state that vouches for them (not ``runs/``): overwrite.

    The state goes first: if clearing is interrupted, nothing vouches for data
    already deleted. ``keep`` (a path under ``_state/``, the current run's plan)
    survives.
    """
    for sub in CLEARED_BY_OVERWRITE:
        if keep is not None and keep.startswith(sub + "/"):
            _clear_except(output.child(sub), keep[len(sub) + 1 :])
            continue
        if output.child(sub).delete_tree():
            logger.info("cleared %s/%s", output.uri.rstrip("/"), sub)


def _clear_except(folder: Location, keep: str) -> None:
    head, _, rest = keep.partition("/")
    for name in folder.list_names():
        if name != head:
            folder.child(name).delete_tree() or folder.child(name).delete()
        elif rest:
            _clear_except(folder.child(name), rest)
