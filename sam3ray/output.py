"""The writer: the only module that knows output paths and file names.

Layout under ``output.uri`` (any fsspec URI)::

    detections/class_id=<uuid>/part-<shard_id>.parquet   one file per (concept, shard)
    images/part-<shard_id>.parquet                        one row per input of the shard
    _markers/<shard_id>.json                              commit marker, written last
    runs/<run_id>.json                                    run summary

Why this shape: names derive from the shard only, so a redone shard overwrites
its own files and rows never duplicate; the marker is written after every data
file, so a marker's presence means the shard is complete (resume trusts it).

Detection files do NOT contain the ``class_id`` column: it lives in the Hive
directory name (and in the file's key-value metadata ``sam3ray.class_id``).
Keeping it in the file too breaks ``pandas.read_parquet(<detections dir>)``
(pyarrow's dictionary-typed partition field cannot merge with a string column),
and storing it dictionary-typed breaks ``pyarrow.dataset(partitioning="hive")``.
Every reader that understands Hive partitioning gets the column back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import Counter
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from sam3ray.output_io import Marker as Marker
from sam3ray.output_io import arrow_filesystem as arrow_filesystem
from sam3ray.output_io import atomic_write as atomic_write
from sam3ray.output_io import filesystem as filesystem
from sam3ray.output_io import marker_from_bytes, parquet_bytes
from sam3ray.output_schema import (
    DETECTIONS_REQUIRED,
    IMAGES_REQUIRED,
    check_shard_tables,
    safe_name,
    utc_now,
    validate_class_id,
    validate_table,
)
from sam3ray.output_schema import DETECTIONS_SCHEMA as DETECTIONS_SCHEMA
from sam3ray.output_schema import IMAGES_SCHEMA as IMAGES_SCHEMA
from sam3ray.output_schema import detections_table as detections_table
from sam3ray.output_schema import empty_detections as empty_detections
from sam3ray.output_schema import empty_images as empty_images
from sam3ray.output_schema import images_table as images_table

logger = logging.getLogger(__name__)

DETECTIONS_DIR = "detections"
IMAGES_DIR = "images"
MARKERS_DIR = "_markers"
RUNS_DIR = "runs"
#: Video staging + stitch state (video_output.py owns the layout inside).
VIDEO_DIR = "_video"
_PARTITIONING = ds.partitioning(pa.schema([("class_id", pa.string())]), flavor="hive")


# -- names ---------------------------------------------------------------------------------


def detections_relpath(class_id: str, shard_id: str) -> str:
    return f"{DETECTIONS_DIR}/class_id={validate_class_id(class_id)}/part-{shard_id}.parquet"


def images_relpath(shard_id: str) -> str:
    return f"{IMAGES_DIR}/part-{shard_id}.parquet"


def marker_relpath(shard_id: str) -> str:
    return f"{MARKERS_DIR}/{shard_id}.json"


def owned_class_id(relpath: str, shard_id: str) -> str | None:
    """The class id if ``relpath`` is a detections file of ``shard_id``, else None."""
    m = re.fullmatch(
        rf"{DETECTIONS_DIR}/class_id=([^/]+)/part-{re.escape(shard_id)}\.parquet", relpath
    )
    if not m:
        return None
    try:
        return validate_class_id(m.group(1))
    except ValueError:
        return None


def _owned_by(relpath: str, shard_id: str) -> bool:
    """True if ``relpath`` is a data file of ``shard_id`` (guards deletes driven by markers)."""
    return relpath == images_relpath(shard_id) or owned_class_id(relpath, shard_id) is not None


class ShardWriter:
    """Writes one shard's files, then its commit marker.

    Holds only the URI and options (the filesystem is created lazily), so it
    pickles cheaply into Ray workers.
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.output_uri = output_uri
        self.storage_options = dict(storage_options or {})
        self._fs: tuple[fsspec.AbstractFileSystem, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"output_uri": self.output_uri, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["output_uri"], state["storage_options"])

    def _path(self, relpath: str) -> tuple[fsspec.AbstractFileSystem, str]:
        if self._fs is None:
            self._fs = filesystem(self.output_uri, self.storage_options)
        fs, root = self._fs
        return fs, f"{root}/{relpath}"

    def _delete(self, relpath: str) -> None:
        fs, path = self._path(relpath)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    def write_shard(
        self,
        shard_id: str,
        members_hash: str,
        detections: pa.Table,
        images: pa.Table,
        run_id: str,
        previous_marker: Marker | None = None,
        settings_hash: str = "",
    ) -> Marker:
        """Validate, write detections per class, the images file, drop stale files, commit.

        ``previous_marker`` (from ``scan_markers``) lists the files an earlier
        attempt wrote; those not rewritten now (a concept no longer found) are
        deleted, so readers never see rows the current attempt did not produce.
        ``settings_hash`` (see ``sam3ray.fingerprint``) goes into the marker, so a
        resume with other labelling settings knows this shard's labels are stale.
        Files of an attempt that died before its marker are not known to anyone:
        they are overwritten if the redo finds the same concepts, else they stay
        (``clear_output`` / overwrite mode removes them); listing every class
        directory per shard to find them would cost too much on object stores.
        """
        safe_name(shard_id, "shard_id")
        safe_name(run_id, "run_id")
        det = validate_table(detections, DETECTIONS_SCHEMA, DETECTIONS_REQUIRED, "detections")
        img = validate_table(images, IMAGES_SCHEMA, IMAGES_REQUIRED, "images")
        check_shard_tables(shard_id, run_id, det, img)
        class_ids = sorted(pc.unique(det.column("class_id")).to_pylist())
        for class_id in class_ids:
            validate_class_id(class_id)

        files: list[str] = []
        order = [("image_id", "ascending"), ("frame_index", "ascending"), ("score", "descending")]
        for class_id in class_ids:
            part = det.filter(pc.equal(det.column("class_id"), class_id)).sort_by(order)
            relpath = detections_relpath(class_id, shard_id)
            meta = {"sam3ray.class_id": class_id, "sam3ray.shard_id": shard_id}
            atomic_write(*self._path(relpath), parquet_bytes(part.drop_columns(["class_id"]), meta))
            files.append(relpath)
        relpath = images_relpath(shard_id)
        img_sorted = img.sort_by([("image_id", "ascending"), ("frame_start", "ascending")])
        atomic_write(
            *self._path(relpath), parquet_bytes(img_sorted, {"sam3ray.shard_id": shard_id})
        )
        files.append(relpath)

        if previous_marker is not None:
            for old in previous_marker.files:
                if old in files:
                    continue
                if _owned_by(old, shard_id):
                    self._delete(old)
                else:
                    logger.warning("marker of %s lists foreign file %r: not deleted", shard_id, old)

        statuses = Counter(img.column("status").to_pylist())
        marker = Marker(
            shard_id=shard_id,
            members_hash=members_hash,
            n_inputs=img.num_rows,
            n_ok=statuses.get("ok", 0),
            n_error=statuses.get("error", 0),
            n_detections=det.num_rows,
            run_id=run_id,
            files=tuple(files),
            written_at=utc_now().isoformat(),
            settings_hash=settings_hash,
        )
        atomic_write(*self._path(marker_relpath(shard_id)), marker.to_json())
        return marker

    def delete_shard(self, marker: Marker) -> None:
        """Remove a shard's data files, then its marker (idempotent; used for orphans)."""
        safe_name(marker.shard_id, "shard_id")
        for relpath in marker.files:
            if _owned_by(relpath, marker.shard_id):
                self._delete(relpath)
        self._delete(marker_relpath(marker.shard_id))


# -- run-level helpers -------------------------------------------------------------------


def write_run_summary(
    output_uri: str, storage_options: dict[str, Any] | None, run_id: str, summary: dict[str, Any]
) -> str:
    """Write ``runs/<run_id>.json`` atomically and return its URI."""
    safe_name(run_id, "run_id")
    fs, root = filesystem(output_uri, storage_options)
    data = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    atomic_write(fs, f"{root}/{RUNS_DIR}/{run_id}.json", data)
    return f"{output_uri.rstrip('/')}/{RUNS_DIR}/{run_id}.json"


def scan_markers(
    output_uri: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Marker]:
    """All commit markers, by shard id: one listing plus one (batched) read.

    A marker that cannot be parsed is logged and treated as absent, so its
    shard is simply redone rather than failing the whole resume.
    """
    fs, root = filesystem(output_uri, storage_options)
    directory = f"{root}/{MARKERS_DIR}"
    fs.invalidate_cache(directory)  # other processes wrote here since our last listing
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return {}
    paths = [p for p in entries if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith(".")]
    blobs = fs.cat(paths, on_error="return") if paths else {}
    markers: dict[str, Marker] = {}
    for path, blob in blobs.items():
        expected = path.rsplit("/", 1)[-1][: -len(".json")]
        try:
            if isinstance(blob, BaseException):
                raise blob
            marker = marker_from_bytes(blob)
            if marker.shard_id != expected:
                raise ValueError(f"shard_id {marker.shard_id!r} does not match the file name")
        except Exception as exc:  # any unreadable marker just means "not done"
            logger.warning("ignoring unreadable marker %s: %s", path, exc)
            continue
        markers[marker.shard_id] = marker
    return markers


def clear_output(output_uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove markers, detections, images and video state (not ``runs/``) for overwrite.

    Markers go first: if clearing is interrupted, no marker survives that
    vouches for data already deleted.
    """
    fs, root = filesystem(output_uri, storage_options)
    for sub in (MARKERS_DIR, DETECTIONS_DIR, IMAGES_DIR, VIDEO_DIR):
        path = f"{root}/{sub}"
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            logger.info("cleared %s/%s", output_uri.rstrip("/"), sub)


def _dataset(
    output_uri: str, storage_options: dict[str, Any] | None, sub: str, schema: pa.Schema
) -> ds.Dataset:
    fs, root = filesystem(output_uri, storage_options)
    path = f"{root}/{sub}"
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return ds.dataset([], schema=schema, format="parquet")
    partitioning = _PARTITIONING if sub == DETECTIONS_DIR else None
    return ds.dataset(
        path,
        filesystem=arrow_filesystem(fs),
        format="parquet",
        schema=schema,
        partitioning=partitioning,
    )


def detections_dataset(
    output_uri: str, storage_options: dict[str, Any] | None = None
) -> ds.Dataset:
    """All detections as one dataset (class_id from the Hive directory names)."""
    return _dataset(output_uri, storage_options, DETECTIONS_DIR, DETECTIONS_SCHEMA)


def images_dataset(output_uri: str, storage_options: dict[str, Any] | None = None) -> ds.Dataset:
    """All images rows as one dataset."""
    return _dataset(output_uri, storage_options, IMAGES_DIR, IMAGES_SCHEMA)
