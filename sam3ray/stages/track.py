"""Track stage (GPU actors): the SAM 3 video model over one video shard.

``setup()`` loads the video model once per actor. ``process`` decodes the
shard's frames itself (seek + forward decode, straight into the model's input
tensor, so a shard's memory is ``shard_frames × 3 × S × S`` whatever the
video's resolution; decoding here avoids shipping frames through the object
store), runs every query in one session that is always closed, and returns the
shard's owned rows (provisional track ids) plus its staging table (every
decoded frame, local ids) for the stitch pass.

Failures are data: a bad video or shard becomes one error images row.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sam3ray.config.schema import (
    InferenceConfig,
    InputConfig,
    ModelConfig,
    ResourcesConfig,
    VideoConfig,
)
from sam3ray.core.errors import DecodeError, error_text
from sam3ray.core.shards import Shard, VideoInfo
from sam3ray.core.types import ConceptSet, Exemplar
from sam3ray.output.video import owned_rows
from sam3ray.sources.prompts import GeometricPrompts, check_exemplars_in_image
from sam3ray.sources.video import decode_frames
from sam3ray.stages.model_stage import ModelStage
from sam3ray.stages.rows import InputInfo, detection_rows, input_row, tables
from sam3ray.stages.tasks import ShardResult, ShardTask

logger = logging.getLogger(__name__)

#: class_id -> (shard-local frame, exemplar)
ShardExemplars = dict[str, list[tuple[int, Exemplar]]]


def shard_exemplars(geometric: GeometricPrompts | None, shard: Shard) -> ShardExemplars:
    """The exemplars falling inside the shard, keyed by class, at shard-local frames.

    ``frame_index`` is in source frame numbers (null: frame 0); with a stride an
    exemplar between two sampled frames goes to the nearest one.
    """
    frames = shard.span.frames
    if geometric is None or not frames:
        return {}
    first, last = frames[0], frames[-1]
    stride = frames[1] - frames[0] if len(frames) > 1 else 1
    out: ShardExemplars = {}
    for class_id, items in geometric.for_image(shard.uris[0], shard.image_ids[0]).items():
        for e in items:
            f = e.frame_index or 0
            if first <= f <= last:
                local = min(len(frames) - 1, round((f - first) / stride))
                out.setdefault(class_id, []).append((local, e))
    return out


class TrackStage(ModelStage):
    """ShardTask (video) → ShardResult with a staging table, one video model per instance."""

    name = "track"
    tracker: Any = None

    def __init__(
        self,
        model: ModelConfig,
        inference: InferenceConfig,
        video: VideoConfig,
        source: InputConfig,
        resources: ResourcesConfig,
        concepts: ConceptSet,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, inference, resources, concepts, **kwargs)
        self.video = video
        self.source = source

    def _load(self) -> str:
        from sam3ray.model.video import VideoTracker

        if self.tracker is None:  # (a test may hand one in)
            self.tracker = VideoTracker.from_config(self.model, self.video, self.checkpoint)
        return self.tracker.model_id

    def process(self, task: ShardTask) -> ShardResult:
        self.setup()
        shard = task.shard
        if not task.concepts:  # drops only: nothing to track
            empty_det, empty_img = tables([], [])
            return ShardResult(task, empty_det, empty_img, self.worker, time.time(), empty_det)
        span = shard.span
        info = span.info
        owned = span.owned
        found: list[dict[str, Any]] = []
        decode_ms = infer_ms = 0.0
        status, reason, error = "ok", None, None
        if span.error_reason:
            status, reason, error = "error", span.error_reason, span.error
        else:
            try:
                exemplars = shard_exemplars(self.geometric, shard)
                problem = _exemplar_problem(exemplars, info)
                if problem:
                    raise DecodeError("exemplar_outside_image", problem)
                t0 = time.perf_counter()
                images, done, stamps = self._decode(shard)
                decode_ms = (time.perf_counter() - t0) * 1000
                owned = (owned[0], min(owned[1], done[-1] + 1))
                t0 = time.perf_counter()
                found = self._track(task, images, done, stamps, exemplars)
                infer_ms = (time.perf_counter() - t0) * 1000
            except DecodeError as exc:
                status, reason, error = "error", exc.reason, str(exc)[:500]
            except Exception as exc:  # keep the job going: this shard becomes an error row
                logger.exception("tracking failed on shard %s", shard.shard_id)
                status, reason, error = "error", "inference_failed", error_text(exc)
                found = []
        staging, _ = tables(found if status == "ok" else [], [])
        det = owned_rows(staging, owned, span.index)
        w, h = (info.width, info.height) if info else (None, None)
        row = input_row(
            InputInfo(self.run_id, shard.image_ids[0], shard.uris[0], w, h, self._model_id),
            shard.shard_id,
            status=status,
            n_detections=det.num_rows,
            decode_ms=decode_ms,
            infer_ms=infer_ms,
            error=error,
            error_reason=reason,
            frames=owned,
        )
        _, images_table = tables([], [row])
        self.metrics.record_image(status, reason)
        if status == "ok":
            self.metrics.record_latency(infer_ms)
        return ShardResult(task, det, images_table, self.worker, time.time(), staging=staging)

    @property
    def _model_id(self) -> str:
        return self.tracker.model_id

    def _decode(self, shard: Shard):
        tensors, stamps = [], {}

        def on_frame(idx, rgb, ts):  # shrunk at once: a shard holds model-size frames only
            tensors.append(self.tracker.prepare_frame(rgb))
            stamps[idx] = ts

        info = shard.span.info
        frames = shard.span.frames
        done = decode_frames(info, frames, on_frame, self.source.location(info.uri))
        if not done:
            reason = "truncated" if info.frames_exact else "beyond_end"
            raise DecodeError(reason, f"no frame at or after {frames[0]} could be decoded")
        return tensors, done, stamps

    def _track(self, task: ShardTask, images, done, stamps, exemplars) -> list[dict[str, Any]]:
        from sam3ray.model.video_queries import build_video_queries, merge_tracks

        shard = task.shard
        concepts = self.concepts
        if not task.fresh:  # a relabel of some concepts
            concepts = ConceptSet(tuple(c for c in concepts if c.class_id in task.concepts))
        info = shard.span.info
        queries = build_video_queries(concepts, exemplars, self.inference.conf, done)
        found = self.tracker.track(images, (info.height, info.width), queries)
        found = merge_tracks(found, queries, self.inference)
        info_row = InputInfo(
            self.run_id, shard.image_ids[0], shard.uris[0], info.width, info.height, self._model_id
        )
        return detection_rows(info_row, found, frame_index=dict(enumerate(done)), timestamps=stamps)


def _exemplar_problem(exemplars: ShardExemplars, info: VideoInfo | None) -> str | None:
    if not exemplars or info is None:
        return None
    flat = {c: [e for _, e in items] for c, items in exemplars.items()}
    return check_exemplars_in_image(flat, info.width, info.height)
