"""The output layout: every relative path under ``output.uri``, and nothing else.

    detections/class_id=<uuid>/part-<shard_id>.parquet   one file per (concept, shard)
    images/part-<shard_id>.parquet                        one row per input of the shard
    _markers/<shard_id>.json                              commit marker, written last
    runs/<run_id>.json                                    run summary
    _video/shards/<shard_id>.parquet                      video staging: all decoded frames
    _video/stitch/<video_id>.json                         which shard versions ids came from
    stats/{concepts,runs}.parquet                         written by ``sam3ray stats``
    _state/…                                              what is labelled (``output.state``)

Names derive from ids only, so a redone shard overwrites its own files and
rows never duplicate. Only validated canonical UUIDs and safe ids become path
components; concept names never do.
"""

from __future__ import annotations

import re
import uuid

DETECTIONS_DIR = "detections"
IMAGES_DIR = "images"
MARKERS_DIR = "_markers"
RUNS_DIR = "runs"
VIDEO_DIR = "_video"
STAGING_DIR = f"{VIDEO_DIR}/shards"
STITCH_DIR = f"{VIDEO_DIR}/stitch"
STATS_DIR = "stats"
STATE_DIR = "_state"
#: What ``output.mode: overwrite`` clears (the state that vouches for labels first);
#: ``runs/`` is history and stays.
CLEARED_BY_OVERWRITE = (STATE_DIR, MARKERS_DIR, DETECTIONS_DIR, IMAGES_DIR, VIDEO_DIR)
#: The folders whose presence says "this is a sam3ray output".
OUTPUT_DIRS = (DETECTIONS_DIR, IMAGES_DIR, RUNS_DIR)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_class_id(class_id: str) -> str:
    """Return ``class_id`` if it is a canonical UUID string, else raise ValueError.

    It becomes a directory name: only the canonical form (lower-case, hyphens)
    is accepted, so no concept text or crafted value can ever reach a path.
    """
    try:
        canonical = str(uuid.UUID(str(class_id)))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"class_id {class_id!r} is not a UUID") from exc
    if canonical != class_id:
        raise ValueError(f"class_id {class_id!r} is not canonical (expected {canonical!r})")
    return class_id


def safe_name(value: str, what: str) -> str:
    """Guard ids that become file names (shard ids, run ids, video ids)."""
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise ValueError(f"{what} {value!r} is not a safe file name ([A-Za-z0-9_.-], <=128)")
    return value


def detections_path(class_id: str, shard_id: str) -> str:
    return f"{DETECTIONS_DIR}/class_id={validate_class_id(class_id)}/part-{shard_id}.parquet"


def images_path(shard_id: str) -> str:
    return f"{IMAGES_DIR}/part-{shard_id}.parquet"


def marker_path(shard_id: str) -> str:
    return f"{MARKERS_DIR}/{safe_name(shard_id, 'shard_id')}.json"


def run_summary_path(run_id: str) -> str:
    return f"{RUNS_DIR}/{safe_name(run_id, 'run_id')}.json"


def staging_path(shard_id: str) -> str:
    return f"{STAGING_DIR}/{safe_name(shard_id, 'shard_id')}.parquet"


def stitch_path(video_id: str) -> str:
    return f"{STITCH_DIR}/{safe_name(video_id, 'video_id')}.json"


def stats_path(name: str) -> str:
    return f"{STATS_DIR}/{safe_name(name, 'stats table')}.parquet"


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


def owned_by(relpath: str, shard_id: str) -> bool:
    """True if ``relpath`` is a data file of ``shard_id`` (guards deletes driven by markers)."""
    return relpath == images_path(shard_id) or owned_class_id(relpath, shard_id) is not None
