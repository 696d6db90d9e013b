"""The video job's stages as plain callables that know nothing of Ray.

A row is one video shard (``video_plan.VideoShard.to_row()``).

- :class:`TrackShard` (GPU): ``setup()`` loads the SAM 3 video model once;
  ``__call__`` decodes the shard's frames itself (seek + forward decode,
  straight into the model's input tensor, so a shard's memory is
  ``shard_frames × 3 × S × S`` float16 whatever the video's resolution), runs
  every query on it in one session that is always closed, and returns the
  staging table (all decoded frames, local track ids) and the images row.
  Decoding in the actor avoids shipping decoded frames through the object store.
- :func:`write_video_shard` (CPU): staging file, then the shard's detections
  (owned frames, provisional ids) and images row through ``ShardWriter``.
- ``video_output.stitch_video`` (CPU, per video, afterwards): global track ids.

Failures are data: a bad video or shard becomes one error images row.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from sam3ray.decode import DecodeError
from sam3ray.output_schema import detections_table, images_table, utc_now
from sam3ray.stages import commit_shard, from_ipc, to_ipc
from sam3ray.types import ConceptSet, Exemplar
from sam3ray.video_plan import info_from_row

logger = logging.getLogger(__name__)


@dataclass
class TrackSpec:
    """Everything a video actor needs (small and picklable)."""

    checkpoint: str
    concepts: ConceptSet
    geometric: Any = None  # prompts.GeometricPrompts | None
    device: str = "auto"
    cache_dir: str | None = None
    model_storage_options: dict[str, Any] = field(default_factory=dict)
    input_storage_options: dict[str, Any] = field(default_factory=dict)
    conf: float = 0.4
    iou: float = 0.7  # tracks of synonyms of one class repeating each other
    run_id: str = "run"
    feature_cache_mib: int = 4096  # frames' image features kept per shard (0: off)


def shard_exemplars(geometric, row: dict[str, Any]) -> dict[str, list[tuple[int, Exemplar]]]:
    """The exemplars falling inside the shard, keyed by class, at shard-local frames.

    ``frame_index`` is in source frame numbers (null: frame 0); with a stride an
    exemplar between two sampled frames goes to the nearest one.
    """
    if geometric is None or not row["frames"]:
        return {}
    frames = row["frames"]
    first, last = frames[0], frames[-1]
    stride = frames[1] - frames[0] if len(frames) > 1 else 1
    out: dict[str, list[tuple[int, Exemplar]]] = {}
    for class_id, items in geometric.for_image(row["uri"], row["video_id"]).items():
        for e in items:
            f = e.frame_index or 0
            if first <= f <= last:
                local = min(len(frames) - 1, round((f - first) / stride))
                out.setdefault(class_id, []).append((local, e))
    return out


class TrackShard:
    """SAM 3 video over one shard at a time; the model is loaded once per instance."""

    loads = 0  # per process: a test asserts one load per actor

    def __init__(self, spec: TrackSpec) -> None:
        self.spec = spec
        self.tracker = None

    def setup(self) -> None:
        from sam3ray.model.video import VideoTracker

        s = self.spec
        t0 = time.perf_counter()
        self.tracker = VideoTracker.from_checkpoint(
            s.checkpoint,
            device=s.device,
            cache_dir=s.cache_dir,
            storage_options=s.model_storage_options,
            feature_cache_mib=s.feature_cache_mib,
        )
        type(self).loads += 1
        self.setup_s = time.perf_counter() - t0
        logger.info("SAM 3 video loaded in %.1f s (%s)", self.setup_s, self.tracker.model_id)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.tracker is None:
            self.setup()
        status, reason, error = "ok", None, row.get("error")
        info = info_from_row(row.get("info"))
        owned = list(row["owned"])
        dets: list[dict[str, Any]] = []
        decode_ms = infer_ms = 0.0
        if row.get("error_reason"):
            status, reason = "error", row["error_reason"]
        else:
            try:
                exemplars = shard_exemplars(self.spec.geometric, row)
                problem = _exemplar_problem(exemplars, info)
                if problem:
                    raise DecodeError("exemplar_outside_image", problem)
                t0 = time.perf_counter()
                images, done, stamps = self._decode(row, info)
                decode_ms = (time.perf_counter() - t0) * 1000
                owned[1] = min(owned[1], done[-1] + 1)
                t0 = time.perf_counter()
                dets = self._track(row, info, images, done, stamps, exemplars)
                infer_ms = (time.perf_counter() - t0) * 1000
            except DecodeError as exc:
                status, reason, error = "error", exc.reason, str(exc)[:500]
            except Exception as exc:  # keep the job going: this shard becomes an error row
                logger.exception("tracking failed on shard %s", row["shard_id"])
                status, reason = "error", "inference_failed"
                error = f"{type(exc).__name__}: {exc}"[:500]
                dets = []
        n_owned = sum(1 for d in dets if owned[0] <= d["frame_index"] < owned[1])
        image_row = {
            "run_id": self.spec.run_id, "image_id": row["video_id"], "uri": row["uri"],
            "shard_id": row["shard_id"], "frame_start": owned[0], "frame_end": owned[1],
            "status": status, "error": error if status == "error" else None,
            "error_reason": reason, "n_detections": n_owned if status == "ok" else 0,
            "width": info.width if info else None, "height": info.height if info else None,
            "decode_ms": decode_ms, "infer_ms": infer_ms, "created_at": utc_now(),
        }  # fmt: skip
        return {
            "shard_id": row["shard_id"],
            "members_hash": row["members_hash"],
            "settings_hash": row.get("settings_hash") or "",
            "video_id": row["video_id"],
            "index": row["index"],
            "owned": owned,
            "previous_files": row.get("previous_files") or [],
            "staging_ipc": to_ipc(detections_table(dets if status == "ok" else [])),
            "images_ipc": to_ipc(images_table([image_row])),
            "actor_pid": os.getpid(),
            "actor_loads": type(self).loads,
            "finished_at": time.time(),  # wall clock: throughput across actors
        }

    def _decode(self, row, info):
        import torch

        from sam3ray.model.video import frame_to_tensor
        from sam3ray.video_decode import decode_frames

        tensors, stamps = [], {}

        def on_frame(idx, rgb, ts):
            tensors.append(frame_to_tensor(rgb, self.tracker.image_size))
            stamps[idx] = ts

        done = decode_frames(info, row["frames"], on_frame, self.spec.input_storage_options)
        if not done:
            reason = "truncated" if info.frames_exact else "beyond_end"
            raise DecodeError(reason, f"no frame at or after {row['frames'][0]} could be decoded")
        return torch.stack(tensors), done, stamps

    def _track(self, row, info, images, done, stamps, exemplars) -> list[dict[str, Any]]:
        from sam3ray.model.video_queries import build_video_queries, dedupe_tracks

        queries = build_video_queries(self.spec.concepts, exemplars, self.spec.conf)
        found = self.tracker.track(images, (info.height, info.width), queries)
        found = dedupe_tracks(found, queries, self.spec.iou)
        now = utc_now()
        return [
            {
                "run_id": self.spec.run_id,
                "image_id": row["video_id"],
                "uri": row["uri"],
                "frame_index": done[d.frame],
                "timestamp_s": stamps[done[d.frame]],
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
                "model": self.tracker.model_id,
                "created_at": now,
            }  # fmt: skip
            for d in found
        ]


def _exemplar_problem(exemplars, info) -> str | None:
    from sam3ray.prompts import check_exemplars_in_image

    if not exemplars or info is None:
        return None
    flat = {c: [e for _, e in items] for c, items in exemplars.items()}
    return check_exemplars_in_image(flat, info.width, info.height)


def write_video_shard(
    row: dict[str, Any], *, output_uri: str, storage_options: dict[str, Any], run_id: str
) -> dict[str, Any]:
    """Staging file, then the shard's output files and marker; returns its summary row."""
    from sam3ray.video_output import owned_rows, write_staging

    staging = from_ipc(row["staging_ipc"])
    img = from_ipc(row["images_ipc"])
    write_staging(output_uri, storage_options, row["shard_id"], staging)
    det = owned_rows(staging, row["owned"], row["index"])
    return commit_shard(
        row, det, img, output_uri=output_uri, storage_options=storage_options, run_id=run_id
    )
