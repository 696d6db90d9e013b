"""The one builder of detection rows and the one builder of images rows.

Images and video shards produce the same columns (``output.schema``); only
the video path fills ``frame_index``, ``timestamp_s``, ``track_id`` and the
images row's ``frame_start``/``frame_end``. Keeping one builder each is what
stops the two paths from drifting apart again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from sam3ray.core.types import Detection
from sam3ray.output.schema import detections_table, images_table, utc_now


@dataclass(frozen=True)
class InputInfo:
    """What every row of one input repeats: the run, the input, its size, the model."""

    run_id: str
    image_id: str
    uri: str
    width: int | None
    height: int | None
    model: str


def detection_rows(
    info: InputInfo,
    found: Iterable[Detection],
    *,
    frame_index: dict[int, int] | None = None,
    timestamps: dict[int, float | None] | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Rows for ``found`` on one input; for videos ``frame_index`` maps a detection's
    shard-local frame to its source frame (and ``timestamps`` that frame to seconds)."""
    now = now or utc_now()
    rows = []
    for d in found:
        source_frame = None if frame_index is None else frame_index[d.frame]
        rows.append(
            {
                "run_id": info.run_id,
                "image_id": info.image_id,
                "uri": info.uri,
                "frame_index": source_frame,
                "timestamp_s": None if timestamps is None else timestamps.get(source_frame),
                "track_id": d.track,
                "class_id": d.class_id,
                "concept": d.concept,
                "query": d.query,
                "score": d.score,
                "box": list(d.box),
                "mask_rle": d.mask_rle,
                "mask_size": list(d.mask_size),
                "area": d.area,
                "width": info.width,
                "height": info.height,
                "model": info.model,
                "created_at": now,
            }
        )
    return rows


def input_row(
    info: InputInfo,
    shard_id: str,
    *,
    status: str,
    n_detections: int,
    decode_ms: float,
    infer_ms: float,
    error: str | None = None,
    error_reason: str | None = None,
    frames: tuple[int, int] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The images row of one input (of one video shard: ``frames`` = owned [start, end))."""
    return {
        "run_id": info.run_id,
        "image_id": info.image_id,
        "uri": info.uri,
        "shard_id": shard_id,
        "frame_start": None if frames is None else frames[0],
        "frame_end": None if frames is None else frames[1],
        "status": status,
        "error": error if status == "error" else None,
        "error_reason": error_reason if status == "error" else None,
        "n_detections": n_detections if status == "ok" else 0,
        "width": info.width,
        "height": info.height,
        "decode_ms": float(decode_ms),
        "infer_ms": float(infer_ms),
        "created_at": now or utc_now(),
    }


def tables(
    detections: list[dict[str, Any]], images: list[dict[str, Any]]
) -> tuple[pa.Table, pa.Table]:
    """Both validated tables of a shard."""
    return detections_table(detections), images_table(images)
