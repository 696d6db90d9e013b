"""Video files beside the image job's layout, and the per-video stitch pass.

Under ``output.uri`` the video job adds (the rest is ``output.py``'s layout)::

    _video/shards/<shard_id>.parquet   staging: ALL frames a shard decoded, local track ids
    _video/stitch/<video_id>.json      which shard versions the current global ids came from

Why staging: stitching must be repeatable. When one shard of a video is redone
(resume, retry_errors), its neighbours' global ids may change, and the only
safe source for rewriting them is an immutable copy with local ids; the
staging file is also where the overlap frames a shard does not own are kept
for matching. Order of writes per shard: staging, then the shard's files and
marker (``ShardWriter``), so a marker always implies a staging file.

The stitch pass (:func:`stitch_video`) is idempotent and crash-safe: it reads
the markers, skips the video when the stitch record matches them, else
recomputes global ids from staging and rewrites (through ``ShardWriter``, so
files and marker stay consistent) only shards whose ids or marker changed,
then writes the stitch record last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sam3ray.output import ShardWriter, images_relpath, marker_relpath
from sam3ray.output_io import (
    atomic_write,
    filesystem,
    marker_from_bytes,
    parquet_bytes,
    read_table,
)
from sam3ray.output_schema import safe_name, utc_now
from sam3ray.video_stitch import ShardTracks, provisional_track_id, stitch

logger = logging.getLogger(__name__)

STAGING_DIR = "_video/shards"
STITCH_DIR = "_video/stitch"


def staging_relpath(shard_id: str) -> str:
    return f"{STAGING_DIR}/{safe_name(shard_id, 'shard_id')}.parquet"


def stitch_relpath(video_id: str) -> str:
    return f"{STITCH_DIR}/{safe_name(video_id, 'video_id')}.json"


def write_staging(output_uri: str, opts: Mapping[str, Any] | None, shard_id: str, table) -> None:
    fs, root = filesystem(output_uri, dict(opts or {}))
    atomic_write(fs, f"{root}/{staging_relpath(shard_id)}", parquet_bytes(table))


def owned_rows(staging: pa.Table, owned: Sequence[int], shard_index: int, mapping=None) -> pa.Table:
    """The rows a shard writes: its owned frames, with provisional or global track ids."""
    lo, hi = int(owned[0]), int(owned[1])
    frame = staging.column("frame_index")
    part = staging.filter(pc.and_(pc.greater_equal(frame, lo), pc.less(frame, hi)))
    local = part.column("track_id").to_pylist()
    if mapping is None:
        ids = [provisional_track_id(shard_index, t) for t in local]
    else:
        ids = [mapping[(shard_index, t)] for t in local]
    col = part.schema.get_field_index("track_id")
    return part.set_column(col, "track_id", pa.array(ids, pa.int64()))


def _mapping_hash(mapping: Mapping[tuple[int, int], int], index: int) -> str:
    items = sorted((t, g) for (i, t), g in mapping.items() if i == index)
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()[:16]


def stitch_video(
    output_uri: str,
    storage_options: Mapping[str, Any] | None,
    shards: Sequence[Mapping[str, Any]],
    stitch_iou: float,
) -> dict[str, Any]:
    """Give every track of one video its global id. ``shards``: all the video's shard
    rows (``VideoShard.to_row()``), in order. Returns a small summary."""
    opts = dict(storage_options or {})
    fs, root = filesystem(output_uri, opts)
    video_id = shards[0]["video_id"]
    paths = [f"{root}/{marker_relpath(s['shard_id'])}" for s in shards]
    blobs = fs.cat(paths, on_error="return")
    markers = {}
    for s, p in zip(shards, paths):
        blob = blobs.get(p)
        if blob is None or isinstance(blob, BaseException):
            return {"video_id": video_id, "status": "incomplete", "rewritten": 0}
        markers[s["shard_id"]] = marker_from_bytes(blob)
    record_path = f"{root}/{stitch_relpath(video_id)}"
    try:
        record = json.loads(fs.cat_file(record_path))
    except (FileNotFoundError, ValueError):
        record = {"shards": {}}
    current = {sid: m.written_at for sid, m in markers.items()}
    if {k: v["written_at"] for k, v in record["shards"].items()} == current:
        return {"video_id": video_id, "status": "up_to_date", "rewritten": 0}

    ok = {s["shard_id"] for s in shards if markers[s["shard_id"]].n_ok > 0}
    staging = {}
    for sid in sorted(ok):
        try:
            staging[sid] = read_table(fs, f"{root}/{staging_relpath(sid)}")
        except FileNotFoundError:
            logger.warning("video %s: staging of %s is missing: not stitched", video_id, sid)
            return {"video_id": video_id, "status": "missing_staging", "rewritten": 0}
    tracks = [_shard_tracks(s, staging.get(s["shard_id"]), shards) for s in shards]
    mapping = stitch(tracks, stitch_iou)

    writer = ShardWriter(output_uri, opts)
    new_record: dict[str, Any] = {"video_id": video_id, "shards": {}}
    rewritten = 0
    for s in shards:
        sid, marker = s["shard_id"], markers[s["shard_id"]]
        digest = _mapping_hash(mapping, s["index"]) if sid in ok else ""
        old = record["shards"].get(sid, {})
        if sid in ok and (
            old.get("written_at") != marker.written_at or old.get("mapping") != digest
        ):
            det = owned_rows(staging[sid], s["owned"], s["index"], mapping)
            img = read_table(fs, f"{root}/{images_relpath(sid)}")
            marker = writer.write_shard(
                sid, marker.members_hash, det, img, marker.run_id, marker, marker.settings_hash
            )
            rewritten += 1
        new_record["shards"][sid] = {"written_at": marker.written_at, "mapping": digest}
    new_record["stitched_at"] = utc_now().isoformat()
    atomic_write(fs, record_path, json.dumps(new_record, indent=1, sort_keys=True).encode())
    n_tracks = len(set(mapping.values()))
    logger.info("video %s stitched: %d tracks, %d shards rewritten", video_id, n_tracks, rewritten)
    return {"video_id": video_id, "status": "stitched", "rewritten": rewritten, "tracks": n_tracks}


def _shard_tracks(s: Mapping[str, Any], table: pa.Table | None, shards) -> ShardTracks:
    """Owned first frames and overlap masks of one shard, from its staging table."""
    frames = tuple(s["frames"])
    if table is None:
        return ShardTracks(s["index"], frames, ok=False)
    lo, hi = s["owned"]
    shared: set[int] = set()
    for other in shards:
        if abs(other["index"] - s["index"]) == 1:
            shared |= set(frames) & set(other["frames"])
    out = ShardTracks(s["index"], frames)
    cols = ["frame_index", "track_id", "class_id", "mask_rle", "mask_size"]
    for f, t, c, rle, size in zip(*(table.column(n).to_pylist() for n in cols)):
        if lo <= f < hi and (t not in out.first_frame or f < out.first_frame[t]):
            out.first_frame[t] = f
        if f in shared:
            out.overlap.append((f, t, c, rle, tuple(size)))
    return out
