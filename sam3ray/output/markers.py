"""Commit markers: what ``_markers/<shard_id>.json`` holds and how to read them.

A marker is written after all of its shard's files and overwritten by every
later commit of the shard, so it always describes the shard's current files
(the video stitch pass and readers of one shard use it). Planning does not read
markers one by one: it reads the consolidated state (``output.state``). Strict
parsing treats a damaged marker as absent; a marker that cannot be *read*
(throttling, a dropped connection) is retried, never taken as absent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from sam3ray.output.layout import MARKERS_DIR, marker_path
from sam3ray.storage.location import Location
from sam3ray.storage.retry import READS, is_transient, retry_transient

logger = logging.getLogger(__name__)

_INT_FIELDS = ("n_inputs", "n_ok", "n_error", "n_detections")
_STR_FIELDS = ("shard_id", "run_id", "written_at")


@dataclass(frozen=True)
class Marker:
    """A shard's current commit: ``_markers/<shard_id>.json``, written after its files.

    ``files`` are paths relative to the output root; ``prints`` are the shard's
    per-concept labelling fingerprints (``plan.fingerprint``).
    """

    shard_id: str
    n_inputs: int
    n_ok: int
    n_error: int
    n_detections: int
    run_id: str
    files: tuple[str, ...]
    written_at: str
    prints: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = list(self.files)
        d["prints"] = dict(self.prints)
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_dict(cls, d: Any) -> Marker:
        """Parse a marker dict, raising ValueError on any missing or mistyped field."""
        if not isinstance(d, dict):
            raise ValueError(f"marker is a {type(d).__name__}, not an object")
        for key in _STR_FIELDS:
            if not isinstance(d.get(key), str):
                raise ValueError(f"marker field {key!r} missing or not a string")
        for key in _INT_FIELDS:
            value = d.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"marker field {key!r} missing or not a count")
        files = d.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("marker field 'files' missing or not a list of strings")
        prints = d.get("prints", {})
        if not isinstance(prints, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prints.items()
        ):
            raise ValueError("marker field 'prints' is not a map of strings")
        kwargs = {k: d[k] for k in _STR_FIELDS + _INT_FIELDS}
        return cls(files=tuple(files), prints=tuple(sorted(prints.items())), **kwargs)


def marker_from_bytes(blob: bytes) -> Marker:
    """Parse a marker file's bytes (ValueError on bad JSON or fields)."""
    try:
        data = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"marker is not JSON: {exc}") from exc
    return Marker.from_dict(data)


def _read_batch(folder: Location, names: list[str]) -> dict[str, bytes | BaseException]:
    """Read marker files; transient failures raise (to be retried), missing ones are absent,
    other failures are returned (the caller raises them, outside the retries)."""
    out: dict[str, bytes | BaseException] = {}
    for name, blob in folder.read_many(names).items():
        if isinstance(blob, FileNotFoundError):
            continue  # deleted between the listing and the read (an orphan trim)
        if isinstance(blob, BaseException) and is_transient(blob):
            raise blob
        out[name] = blob
    return out


def scan_markers(output: Location) -> dict[str, Marker]:
    """All commit markers, by shard id: one listing plus batched reads (audits and
    tools; planning reads the consolidated state instead).

    A marker that cannot be parsed is logged and treated as absent, so its shard
    is redone; a read that fails transiently is retried, and any other read
    failure stops the scan (it must never silently mean "not done").
    """
    folder = output.child(MARKERS_DIR)
    names = retry_transient(folder.list_names, f"listing {folder.uri}")
    names = [n for n in names if n.endswith(".json") and not n.startswith(".")]
    blobs = retry_transient(lambda: _read_batch(folder, names), f"reading markers in {folder.uri}")
    for name, blob in sorted(blobs.items()):
        if isinstance(blob, BaseException):  # outside the retries: this OSError is final
            raise OSError(f"cannot read marker {folder.uri}/{name}: {blob!r}") from blob
    markers: dict[str, Marker] = {}
    for name, blob in sorted(blobs.items()):
        expected = name[: -len(".json")]
        try:
            marker = marker_from_bytes(blob)
            if marker.shard_id != expected:
                raise ValueError(f"shard_id {marker.shard_id!r} does not match the file name")
        except ValueError as exc:  # a damaged marker just means "not done"
            logger.warning("ignoring unreadable marker %s/%s: %s", folder.uri, name, exc)
            continue
        markers[marker.shard_id] = marker
    return markers


def read_marker(output: Location, shard_id: str) -> Marker | None:
    """One shard's marker, or None if it has none (transient errors retried)."""
    loc = output.child(marker_path(shard_id))
    try:
        return marker_from_bytes(loc.read_bytes(READS))
    except FileNotFoundError:
        return None
