"""Video state beside the image layout: staging files and the per-video stitch pass.

Why staging (``_video/shards/<shard_id>.parquet``): stitching must be
repeatable. When one shard of a video is redone (resume, retry_errors), its
neighbours' global ids may change, and the only safe source for rewriting them
is an immutable copy with local ids; the staging file is also where the
overlap frames a shard does not own are kept for matching. Order of writes per
shard: staging, then the shard's files and marker, so a marker always implies
a staging file.

The stitch pass (:func:`stitch_video`) is idempotent and crash-safe: it reads
the markers, skips the video when its stitch record matches them (and the same
``stitch_iou``), else recomputes global ids from staging and rewrites (through
``ShardWriter``, so files and marker stay consistent) only shards whose ids or
marker changed, then writes the stitch record last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sam3ray.core.shards import Shard
from sam3ray.output.layout import STITCH_DIR, images_path, staging_path, stitch_path
from sam3ray.output.markers import read_marker
from sam3ray.output.parquet import parquet_bytes, read_table
from sam3ray.output.schema import utc_now
from sam3ray.output.state import span_from, span_json
from sam3ray.output.stitch import ShardTracks, provisional_track_id, stitch
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)


def write_staging(output: Location, shard_id: str, table: pa.Table) -> None:
    output.child(staging_path(shard_id)).write_bytes(parquet_bytes(table))


def owned_rows(
    staging: pa.Table,
    owned: Sequence[int],
    shard_index: int,
    mapping: Mapping[tuple[int, int], int] | None = None,
) -> pa.Table:
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


def _known_shards(record: Mapping[str, Any], video_id: str, uri: str) -> dict[str, Shard]:
    """The shards a video's stitch record remembers (with their frame ranges)."""
    out = {}
    for sid, entry in record.get("shards", {}).items():
        span = span_from(entry.get("span"))
        if span is not None:
            out[sid] = Shard(sid, "video", (uri,), (video_id,), span)
    return out


def stitch_video(
    output: Location, shards: Sequence[Shard], stitch_iou: float, force: bool = False
) -> dict[str, Any]:
    """Give every track of one video its global id; idempotent.

    ``shards``: the video's shards this run committed (the record of the last
    stitch supplies the others, so relabelling one shard restitches the whole
    video). ``force`` restitches even when nothing changed (a new ``stitch_iou``
    is noticed anyway). Returns a small summary (``status``: stitched,
    up_to_date, incomplete, missing_staging).
    """
    video_id = shards[0].image_ids[0]
    record_loc = output.child(stitch_path(video_id))
    try:
        record = json.loads(record_loc.read_bytes())
    except (FileNotFoundError, ValueError):
        record = {"shards": {}}
    known = _known_shards(record, video_id, shards[0].uris[0])
    known.update({s.shard_id: s for s in shards})
    shards = sorted(known.values(), key=lambda s: s.span.index)
    markers = {}
    for s in shards:
        marker = read_marker(output, s.shard_id)
        if marker is None:
            return {"video_id": video_id, "status": "incomplete", "rewritten": 0}
        markers[s.shard_id] = marker
    current = {sid: m.written_at for sid, m in markers.items()}
    same_shards = {k: v["written_at"] for k, v in record["shards"].items()} == current
    if same_shards and record.get("stitch_iou") == stitch_iou and not force:
        return {"video_id": video_id, "status": "up_to_date", "rewritten": 0}

    ok = {s.shard_id for s in shards if markers[s.shard_id].n_ok > 0}
    staging = {}
    for sid in sorted(ok):
        try:
            staging[sid] = read_table(output.child(staging_path(sid)))
        except FileNotFoundError:
            logger.warning("video %s: staging of %s is missing: not stitched", video_id, sid)
            return {"video_id": video_id, "status": "missing_staging", "rewritten": 0}
    tracks = [_shard_tracks(s, staging.get(s.shard_id), shards) for s in shards]
    mapping = stitch(tracks, stitch_iou)

    writer = ShardWriter(output)
    new_record: dict[str, Any] = {
        "video_id": video_id,
        "uri": shards[0].uris[0],
        "stitch_iou": stitch_iou,
        "shards": {},
    }
    rewritten = 0
    for s in shards:
        sid, marker, span = s.shard_id, markers[s.shard_id], s.span
        digest = _mapping_hash(mapping, span.index) if sid in ok else ""
        old = record["shards"].get(sid, {})
        if sid in ok and (
            old.get("written_at") != marker.written_at or old.get("mapping") != digest
        ):
            det = owned_rows(staging[sid], span.owned, span.index, mapping)
            img = read_table(output.child(images_path(sid)))
            marker = writer.write(ShardOutput.rewrite(marker, det, img))
            rewritten += 1
        new_record["shards"][sid] = {
            "written_at": marker.written_at,
            "mapping": digest,
            "span": span_json(span),
        }
    new_record["stitched_at"] = utc_now().isoformat()
    record_loc.write_bytes(json.dumps(new_record, indent=1, sort_keys=True).encode())
    n_tracks = len(set(mapping.values()))
    logger.info("video %s stitched: %d tracks, %d shards rewritten", video_id, n_tracks, rewritten)
    return {"video_id": video_id, "status": "stitched", "rewritten": rewritten, "tracks": n_tracks}


def _shard_tracks(s: Shard, table: pa.Table | None, shards: Sequence[Shard]) -> ShardTracks:
    """Owned first frames and overlap masks of one shard, from its staging table."""
    span = s.span
    frames = tuple(span.frames)
    if table is None:
        return ShardTracks(span.index, frames, ok=False)
    lo, hi = span.owned
    shared: set[int] = set()
    for other in shards:
        if abs(other.span.index - span.index) == 1:
            shared |= set(frames) & set(other.span.frames)
    out = ShardTracks(span.index, frames)
    cols = ["frame_index", "track_id", "class_id", "mask_rle", "mask_size"]
    for f, t, c, rle, size in zip(*(table.column(n).to_pylist() for n in cols)):
        if lo <= f < hi and (t not in out.first_frame or f < out.first_frame[t]):
            out.first_frame[t] = f
        if f in shared:
            out.overlap.append((f, t, c, rle, tuple(size)))
    return out


def stitched_videos(output: Location) -> list[str]:
    """Ids of every video with a stitch record (a new ``stitch_iou`` restitches them all)."""
    return sorted(
        n[: -len(".json")] for n in output.child(STITCH_DIR).list_names() if n.endswith(".json")
    )


def restitch_video(output: Location, video_id: str, stitch_iou: float) -> dict[str, Any]:
    """Stitch one video again from its record (no shard of it was labelled now)."""
    record = json.loads(output.child(stitch_path(video_id)).read_bytes())
    known = list(_known_shards(record, video_id, record["uri"]).values())
    if not known:
        return {"video_id": video_id, "status": "incomplete", "rewritten": 0}
    return stitch_video(output, known, stitch_iou)
