"""Segment stage (GPU actors): read, decode and label one image shard.

``setup()`` loads the model once per actor. ``process`` takes a
:class:`~sam3ray.stages.tasks.ShardTask` (URIs only: rows stay a few KB), reads
and decodes its images ahead of the model in a bounded thread pool
(:class:`~sam3ray.stages.decode.ImageReader`), and runs the engine in batches:
while batch k+1's forward runs on the device, a worker thread turns batch k's
run-length counts into COCO strings and its detection table (one model, two
threads: the device never waits for the host's bookkeeping).

Failures are data. A batch that fails is redone one image at a time, so one
poison image costs only itself (``inference_failed``); a batch that runs out of
device memory is split in halves and retried (and later batches stay at the
smaller size), so memory pressure costs time, never a shard. Exemplars that
do not fit their image are known only after decoding and become that image's
error row (``exemplar_outside_image``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sam3ray.config.schema import InferenceConfig, InputConfig, ModelConfig, ResourcesConfig
from sam3ray.core.errors import error_text
from sam3ray.core.types import ConceptSet
from sam3ray.output.schema import empty_detections
from sam3ray.sources.prompts import check_exemplars_in_image
from sam3ray.stages.decode import DecodedImage, ImageReader
from sam3ray.stages.model_stage import ModelStage
from sam3ray.stages.rows import InputInfo, batch_detections_table, input_row, tables
from sam3ray.stages.tasks import ShardResult, ShardTask

logger = logging.getLogger(__name__)


@dataclass
class _Shard:
    """What one shard's processing accumulates."""

    images: list[DecodedImage] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # index -> detections
    infer_ms: dict[int, float] = field(default_factory=dict)
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (error, reason)
    tables: list[tuple[int, pa.Table]] = field(default_factory=list)  # (first index, table)
    only: tuple[str, ...] | None = None  # a relabel: the concepts to run (None: all)


@dataclass(frozen=True)
class _InFlight:
    """A launched batch whose host phase runs on the worker thread."""

    indices: list[int]
    future: Future
    pixels: dict[int, Any]  # kept until collected: a failed host phase redoes from them


class SegmentStage(ModelStage):
    """ShardTask (images) → ShardResult, with one image model per instance."""

    name = "segment"

    def __init__(
        self,
        model: ModelConfig,
        inference: InferenceConfig,
        source: InputConfig,
        resources: ResourcesConfig,
        concepts: ConceptSet,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, inference, resources, concepts, **kwargs)
        self.source = source
        self.decode_threads = resources.decode_threads
        self.gpu_share = resources.gpus_per_actor
        self._images_per_batch: int | None = None  # lowered after an out-of-memory error
        self.engine: Any = None  # loaded by setup(), once per actor

    def _load(self) -> str:
        from sam3ray.model.engine import Sam3Engine

        self.engine = Sam3Engine.from_config(
            self.model,
            self.concepts,
            self.inference,
            self.checkpoint,
            gpu_share=self.gpu_share or 1.0,
        )
        return self.engine.model_id

    def images_per_batch(self) -> int:
        """The engine's planned batch size, or less after an out-of-memory error."""
        planned = int(self.engine.batch_plan().images_per_batch)
        return min(planned, self._images_per_batch or planned)

    def process(self, task: ShardTask) -> ShardResult:
        self.setup()
        if not task.concepts:  # drops only: nothing to read, nothing to label
            return self._result(task, _Shard())
        # The next batch decodes while the device runs this one. Held decoded at most:
        # the batch on the device, the one in its host phase (kept for a redo), and
        # the reader's window: 3 * images_per_batch + decode_threads.
        window = self.decode_threads + self.images_per_batch()
        reader = ImageReader(self.source, self.decode_threads, window)
        return self.label(task, reader.read(task.shard.uris, task.shard.image_ids))

    def label(self, task: ShardTask, images: Iterable[DecodedImage]) -> ShardResult:
        """Label ``images`` (decoded in the shard's order, e.g. by an
        :class:`ImageReader`, or by the ``sam3ray.label`` operator from bytes or
        arrays) as ``task``'s shard."""
        self.setup()
        acc = _Shard(only=None if task.fresh else task.concepts)
        with ThreadPoolExecutor(1, thread_name_prefix="sam3ray-host") as host:
            inflight: list[_InFlight] = []
            batch: list[int] = []
            pixels: dict[int, Any] = {}
            for img in images:
                i = len(acc.images)
                acc.images.append(img.without_pixels())
                if not img.ok:
                    continue
                problem = self._exemplar_problem(img)
                if problem:
                    acc.failed[i] = (problem, "exemplar_outside_image")
                    continue
                batch.append(i)
                pixels[i] = img.pixels
                if len(batch) >= self.images_per_batch():
                    self._launch(acc, batch, pixels, host, inflight)
                    batch = []
            if batch:
                self._launch(acc, batch, pixels, host, inflight)
            for item in inflight:
                self._collect(acc, item)
        return self._result(task, acc)

    # ------------------------------------------------------------------ batches
    def _launch(self, acc: _Shard, idx: list[int], pixels: dict, host, inflight: list) -> None:
        """Device phase of a batch (split on OOM, one by one on other errors); its host
        phase goes to the worker thread. At most one batch waits there, so decoded
        pixels and device results never pile up. A waiting batch keeps its pixels: if
        its host phase fails, its images are redone from them, not read again."""
        for part, pending, ms in self._device_phase(acc, idx, pixels):
            for i in part:
                acc.infer_ms[i] = ms
            fut = host.submit(self._host_phase, acc.images, part, pending)
            inflight.append(_InFlight(part, fut, {i: pixels[i] for i in part}))
            while len(inflight) > 1:
                self._collect(acc, inflight.pop(0))
        for i in idx:
            pixels.pop(i, None)

    def _device_phase(self, acc: _Shard, idx: list[int], pixels: dict) -> list[tuple]:
        """[(indices, PendingBatch, ms per image)] for ``idx``; failures recorded in ``acc``."""
        from sam3ray.model.device import is_out_of_memory

        t0 = time.perf_counter()
        try:
            pending = self.engine.launch(
                [pixels[i] for i in idx], self._exemplars(acc, idx), acc.only
            )
        except Exception as exc:
            oom = is_out_of_memory(exc)
            if len(idx) == 1:
                logger.exception("inference failed on %s", acc.images[idx[0]].uri)
                acc.failed[idx[0]] = (error_text(exc), "inference_failed")
                parts = []
            elif oom:  # memory, not a poison image: halve the batch, and later ones
                half = (len(idx) + 1) // 2
                self._images_per_batch = min(self.images_per_batch(), half)
                logger.warning("out of memory on %d images: retrying as %d", len(idx), half)
                parts = [idx[:half], idx[half:]]
            else:  # find the input(s) that broke the batch; the rest keep their labels
                logger.exception("inference failed on a batch of %d; one by one", len(idx))
                parts = [[i] for i in idx]
        else:
            ms = (time.perf_counter() - t0) * 1000 / len(idx)
            return [(idx, pending, ms)]
        # Out of the except block: its traceback pinned the failed batch's frames
        # (backbone features, every pack's candidates); only now can they be freed.
        if oom:
            self.engine.release_memory()
        return [r for part in parts for r in self._device_phase(acc, part, pixels)]

    def _host_phase(self, images: list[DecodedImage], idx: list[int], pending: Any) -> tuple:
        """(detections table, detections per image) of a launched batch (worker thread)."""
        found = pending.result()
        infos = [self._info(images[i]) for i in idx]
        return batch_detections_table(infos, found), found.counts().tolist()

    def _collect(self, acc: _Shard, item: _InFlight) -> None:
        idx = item.indices
        try:
            table, counts = item.future.result()
        except Exception as exc:  # the host phase broke: redo these images one by one
            logger.exception("post-processing failed on a batch of %d", len(idx))
            if len(idx) == 1:
                acc.failed[idx[0]] = (error_text(exc), "inference_failed")
                return
            self._redo_alone(acc, idx, item.pixels)
            return
        acc.tables.append((idx[0], table))
        acc.counts.update(zip(idx, counts, strict=True))

    def _redo_alone(self, acc: _Shard, idx: list[int], pixels: dict[int, Any]) -> None:
        """Relabel each image of ``idx`` alone from its kept pixels, synchronously."""
        for i in idx:
            try:
                pending = self.engine.launch([pixels[i]], self._exemplars(acc, [i]), acc.only)
                table, counts = self._host_phase(acc.images, [i], pending)
            except Exception as exc:
                logger.exception("inference failed on %s", acc.images[i].uri)
                acc.failed[i] = (error_text(exc), "inference_failed")
                continue
            acc.tables.append((i, table))
            acc.counts[i] = counts[0]

    # ------------------------------------------------------------------ helpers
    def _exemplars(self, acc: _Shard, idx: list[int]) -> list | None:
        if self.geometric is None:
            return None
        return [self.geometric.for_image(acc.images[i].uri, acc.images[i].image_id) for i in idx]

    def _exemplar_problem(self, img: DecodedImage) -> str | None:
        if self.geometric is None:
            return None
        ex = self.geometric.for_image(img.uri, img.image_id)
        h, w = img.size
        return check_exemplars_in_image(ex, int(w), int(h)) if ex else None

    def _info(self, img: DecodedImage) -> InputInfo:
        h, w = img.size or (None, None)
        return InputInfo(self.run_id, img.image_id, img.uri, w, h, self.engine.model_id)

    def _result(self, task: ShardTask, acc: _Shard) -> ShardResult:
        shard_id = task.shard_id
        img_rows = []
        for i, img in enumerate(acc.images):
            error, reason = acc.failed.get(i, (img.error, img.error_reason))
            status = "error" if reason else "ok"
            img_rows.append(
                input_row(
                    self._info(img),
                    shard_id,
                    status=status,
                    n_detections=acc.counts.get(i, 0) if status == "ok" else 0,
                    decode_ms=img.decode_ms,
                    infer_ms=acc.infer_ms.get(i, 0.0) if status == "ok" else 0.0,
                    error=error,
                    error_reason=reason,
                )
            )
            self.metrics.record_image(status, reason)
            if status == "ok":
                self.metrics.record_latency(acc.infer_ms.get(i, 0.0))
        ok_tables = [t for _, t in sorted(acc.tables, key=lambda x: x[0])]
        det = pa.concat_tables(ok_tables) if ok_tables else empty_detections()
        for concept, n in Counter(det.column("concept").to_pylist()).items():
            self.metrics.record_detections(concept, n)
        det, img = tables(det, img_rows)
        return ShardResult(task, det, img, self.worker, time.time())
