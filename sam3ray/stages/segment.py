"""Segment stage (GPU actors): SAM 3 over the decoded images of one shard.

``setup()`` loads the model once per actor; ``process`` runs the engine in
batches of ``inference.images_per_batch``. A batch that fails is redone one
image at a time, so one poison image costs only itself (``inference_failed``).
Exemplars that do not fit their image are known only now (after decoding) and
become that image's error row (``exemplar_outside_image``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from sam3ray.core.errors import error_text
from sam3ray.core.types import Detection
from sam3ray.sources.prompts import check_exemplars_in_image
from sam3ray.stages.model_stage import ModelStage
from sam3ray.stages.rows import InputInfo, detection_rows, input_row, tables
from sam3ray.stages.tasks import DecodedImage, DecodedShard, ShardResult

logger = logging.getLogger(__name__)


class SegmentStage(ModelStage):
    """DecodedShard → ShardResult, with one image model per instance."""

    name = "segment"
    engine: Any = None

    def _load(self) -> str:
        from sam3ray.model.engine import Sam3Engine

        if self.engine is None:  # (a test may hand one in)
            self.engine = Sam3Engine.from_config(
                self.model, self.concepts, self.inference, self.checkpoint
            )
        return self.engine.model_id

    def process(self, task: DecodedShard) -> ShardResult:
        self.setup()
        images = list(task.images)
        only = None if task.task.fresh else task.task.concepts
        found: dict[int, list[Detection]] = {}
        infer_ms = [0.0] * len(images)
        failed: dict[int, tuple[str, str]] = {}  # index -> (error, reason)
        todo = []
        for i, img in enumerate(images):
            if not img.ok:
                continue
            problem = self._exemplar_problem(img)
            if problem:
                failed[i] = (problem, "exemplar_outside_image")
            else:
                todo.append(i)
        step = max(1, self.inference.images_per_batch)
        for start in range(0, len(todo), step):
            batch = todo[start : start + step]
            try:
                self._run(images, batch, found, infer_ms, only)
            except Exception:  # keep the shard: find the input(s) that broke the batch
                logger.exception("inference failed on shard %s; one by one", task.task.shard_id)
                for i in batch:  # one poison image must not cost its batch-mates their labels
                    try:
                        self._run(images, [i], found, infer_ms, only)
                    except Exception as exc:
                        logger.exception("inference failed on %s", images[i].uri)
                        failed[i] = (error_text(exc), "inference_failed")
                        found.pop(i, None)
                        infer_ms[i] = 0.0
        return self._result(task, images, found, infer_ms, failed)

    def _exemplar_problem(self, img: DecodedImage) -> str | None:
        if self.geometric is None:
            return None
        ex = self.geometric.for_image(img.uri, img.image_id)
        h, w = img.orig_size
        return check_exemplars_in_image(ex, int(w), int(h)) if ex else None

    def _run(self, images: list[DecodedImage], idx: list[int], found, infer_ms, only) -> None:
        exemplars = None
        if self.geometric is not None:
            exemplars = [self.geometric.for_image(images[i].uri, images[i].image_id) for i in idx]
        t0 = time.perf_counter()
        results = self.engine.predict(
            [images[i].pixels for i in idx],
            exemplars=exemplars,
            orig_sizes=[images[i].orig_size for i in idx],
            only=only,
        )
        per_image_ms = (time.perf_counter() - t0) * 1000 / len(idx)
        for i, dets in zip(idx, results, strict=True):
            found[i] = dets
            infer_ms[i] = per_image_ms

    def _result(self, task, images, found, infer_ms, failed) -> ShardResult:
        shard_id = task.task.shard_id
        det_rows, img_rows = [], []
        for i, img in enumerate(images):
            h, w = img.orig_size or (None, None)
            info = InputInfo(self.run_id, img.image_id, img.uri, w, h, self.engine.model_id)
            error, reason = failed.get(i, (img.error, img.error_reason))
            status = "error" if reason else "ok"
            dets = found.get(i, []) if status == "ok" else []
            det_rows += detection_rows(info, dets)
            img_rows.append(
                input_row(
                    info,
                    shard_id,
                    status=status,
                    n_detections=len(dets),
                    decode_ms=img.decode_ms,
                    infer_ms=infer_ms[i] if status == "ok" else 0.0,
                    error=error,
                    error_reason=reason,
                )
            )
            self.metrics.record_image(status, reason)
            if status == "ok":
                self.metrics.record_latency(infer_ms[i])
        for concept, n in Counter(d["concept"] for d in det_rows).items():
            self.metrics.record_detections(concept, n)
        det, img = tables(det_rows, img_rows)
        return ShardResult(task.task, det, img, self.worker, time.time())
