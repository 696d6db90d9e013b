"""The job's three stages as plain callables that know nothing of Ray.

A row is a *shard* (see shards.py): ``shard_id``, ``members_hash``,
``settings_hash``, ``uris``, ``image_ids``, ``previous_files``. Each stage takes
a row dict and returns one:

- :func:`decode_shard` (CPU): read bytes through fsspec, decode, downscale to
  ``max_imgsz``; a bad input becomes an error entry, never an exception.
- :class:`SegmentShard` (GPU): ``setup()`` loads SAM 3 once; ``__call__`` runs
  the engine over the shard in batches of ``images_per_batch`` and returns the
  detections and images tables as Arrow IPC bytes.
- :func:`write_shard` (CPU): writes the shard's files and commit marker and
  returns a small summary row for the driver.

pipeline.py turns them into Ray Data operators; tests call them directly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from sam3ray.decode import DecodeError, decode_image, downscale_long_side
from sam3ray.inputs import read_bytes, retry_transient
from sam3ray.metrics import Metrics, NullMetrics
from sam3ray.output_schema import detections_table, images_table, utc_now
from sam3ray.types import ConceptSet

logger = logging.getLogger(__name__)


def _error_reason(exc: BaseException) -> str:
    if isinstance(exc, DecodeError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, PermissionError):
        return "forbidden"
    return "read_failed"


def decode_shard(
    row: dict[str, Any],
    *,
    storage_options: dict[str, Any],
    max_pixels: int,
    max_imgsz: int,
) -> dict[str, Any]:
    """Read and decode every image of a shard; failures are kept as data."""
    pixels, shapes, orig, status, errors, reasons, decode_ms = [], [], [], [], [], [], []
    for uri in row["uris"]:
        t0 = time.perf_counter()
        try:
            img = decode_image(read_bytes(uri, storage_options), max_pixels=max_pixels)
            h, w = img.shape[:2]
            small = downscale_long_side(img, max_imgsz)
            pixels.append(np.ascontiguousarray(small).tobytes())
            shapes.append(list(small.shape[:2]))
            orig.append([h, w])
            status.append("ok")
            errors.append(None)
            reasons.append(None)
        except Exception as exc:  # one poison file must not cost the shard
            pixels.append(b"")
            shapes.append([0, 0])
            orig.append([0, 0])
            status.append("error")
            errors.append(f"{type(exc).__name__}: {exc}"[:500])
            reasons.append(_error_reason(exc))
        decode_ms.append((time.perf_counter() - t0) * 1000)
    return {
        **row,
        "pixels": pixels,
        "shapes": shapes,
        "orig_sizes": orig,
        "status": status,
        "errors": errors,
        "error_reasons": reasons,
        "decode_ms": decode_ms,
    }


# -- fault injection (tests only; off unless the environment asks for it) -----------------

#: Hard-exit the SAM 3 actor process on its N-th shard, after inference and before the
#: result is returned, so the shard's work is lost and must be redone by a restarted
#: actor. Fires once per job: the first process to fire creates a marker file in
#: ``SAM3RAY_FAULT_STATE_DIR`` (required) and restarted actors see it and carry on.
FAULT_ACTOR_EXIT_ON_BATCH = "SAM3RAY_FAULT_ACTOR_EXIT_ON_BATCH"
FAULT_STATE_DIR = "SAM3RAY_FAULT_STATE_DIR"
#: Environment variables that pipeline.py forwards from the driver to the actors.
FAULT_ENV_VARS = (FAULT_ACTOR_EXIT_ON_BATCH, FAULT_STATE_DIR)


def _fault_actor_exit(batch_number: int) -> None:
    wanted = os.environ.get(FAULT_ACTOR_EXIT_ON_BATCH, "")
    if not wanted.strip().isdigit() or int(wanted) != batch_number:
        return
    state_dir = os.environ.get(FAULT_STATE_DIR)
    if not state_dir:
        logger.warning("%s is set but %s is not: no fault injected", *FAULT_ENV_VARS)
        return
    marker = os.path.join(state_dir, "actor-exit.fired")
    try:  # O_EXCL: exactly one process in the whole job wins
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.write(fd, f"pid {os.getpid()} batch {batch_number}\n".encode())
    os.close(fd)
    logger.warning("fault injection: actor %d exits hard on batch %d", os.getpid(), batch_number)
    os._exit(17)


@dataclass
class SegmentSpec:
    """Everything an actor needs to build its engine (small and picklable)."""

    checkpoint: str
    concepts: ConceptSet
    geometric: Any = None  # prompts.GeometricPrompts | None
    device: str = "auto"
    dtype: str = "bfloat16"
    compile: bool = False
    cache_dir: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    images_per_batch: int = 8
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    run_id: str = "run"
    #: Where counters go (pipeline passes RayMetrics; tests and plain Python use NullMetrics).
    metrics: Metrics = field(default_factory=NullMetrics)


class SegmentShard:
    """SAM 3 over one shard at a time; the model is loaded once per instance."""

    loads = 0  # per process: a test asserts one load per actor

    def __init__(self, spec: SegmentSpec) -> None:
        self.spec = spec
        self.engine = None
        self.batches = 0  # shards handled by this instance (fault injection counts them)

    def setup(self) -> None:
        from sam3ray.model.engine import EngineConfig, Sam3Engine

        s = self.spec
        t0 = time.perf_counter()
        self.engine = Sam3Engine.from_checkpoint(
            s.checkpoint,
            s.concepts,
            EngineConfig(**s.engine),
            device=s.device,
            dtype=s.dtype,
            compile=s.compile,
            cache_dir=s.cache_dir,
            storage_options=s.storage_options,
        )
        type(self).loads += 1
        self.setup_s = time.perf_counter() - t0
        logger.info("SAM 3 loaded in %.1f s (%s)", self.setup_s, self.engine.model_id)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.engine is None:
            self.setup()
        n = len(row["uris"])
        status = list(row["status"])
        errors = list(row["errors"])
        reasons = list(row["error_reasons"])
        infer_ms = [0.0] * n
        dets: list[dict[str, Any]] = []
        n_det = [0] * n
        todo = [i for i in range(n) if status[i] == "ok"]
        todo = self._check_exemplars(row, todo, status, errors, reasons)
        step = max(1, self.spec.images_per_batch)
        for start in range(0, len(todo), step):
            idx = todo[start : start + step]
            try:
                self._run_batch(row, idx, dets, n_det, infer_ms)
            except Exception:  # keep the shard: find the input(s) that broke the batch
                logger.exception(
                    "inference failed on shard %s; retrying one by one", row["shard_id"]
                )
                dets = [d for d in dets if d["image_id"] not in {row["image_ids"][i] for i in idx}]
                for i in idx:  # one poison image must not cost its batch-mates their labels
                    try:
                        self._run_batch(row, [i], dets, n_det, infer_ms)
                    except Exception as exc:
                        logger.exception("inference failed on %s", row["uris"][i])
                        status[i], reasons[i] = "error", "inference_failed"
                        errors[i] = f"{type(exc).__name__}: {exc}"[:500]
                        n_det[i], infer_ms[i] = 0, 0.0
                        dets = [d for d in dets if d["image_id"] != row["image_ids"][i]]
        self.batches += 1
        _fault_actor_exit(self.batches)  # no-op unless a fault-injection test asks for it
        self._record_metrics(status, reasons, infer_ms, dets)
        images = self._images_rows(row, status, errors, reasons, n_det, infer_ms)
        return {
            "shard_id": row["shard_id"],
            "members_hash": row["members_hash"],
            "settings_hash": row.get("settings_hash") or "",
            "previous_files": row.get("previous_files") or [],
            "detections_ipc": to_ipc(detections_table(dets)),
            "images_ipc": to_ipc(images_table(images)),
            "actor_pid": os.getpid(),
            "actor_loads": type(self).loads,
            "finished_at": time.time(),  # wall clock: throughput across actors
        }

    def _record_metrics(self, status, reasons, infer_ms, dets) -> None:
        """At-least-once counters (a retried shard counts again): for dashboards, not truth."""
        m = self.spec.metrics
        for i, st in enumerate(status):
            m.record_image(st, reasons[i])
            if st == "ok":
                m.record_latency(infer_ms[i])
        for concept, k in Counter(d["concept"] for d in dets).items():
            m.record_detections(concept, k)

    def _check_exemplars(self, row, todo, status, errors, reasons) -> list[int]:
        from sam3ray.prompts import check_exemplars_in_image

        if self.spec.geometric is None:
            return todo
        keep = []
        for i in todo:
            ex = self.spec.geometric.for_image(row["uris"][i], row["image_ids"][i])
            h, w = row["orig_sizes"][i]
            problem = check_exemplars_in_image(ex, int(w), int(h)) if ex else None
            if problem:
                status[i], errors[i], reasons[i] = "error", problem, "exemplar_outside_image"
            else:
                keep.append(i)
        return keep

    def _run_batch(self, row, idx, dets, n_det, infer_ms) -> None:
        images = []
        for i in idx:
            h, w = row["shapes"][i]
            images.append(np.frombuffer(row["pixels"][i], dtype=np.uint8).reshape(h, w, 3))
        orig = [tuple(row["orig_sizes"][i]) for i in idx]
        exemplars = None
        if self.spec.geometric is not None:
            exemplars = [
                self.spec.geometric.for_image(row["uris"][i], row["image_ids"][i]) for i in idx
            ]
        t0 = time.perf_counter()
        results = self.engine.predict(images, exemplars=exemplars, orig_sizes=orig)
        per_image_ms = (time.perf_counter() - t0) * 1000 / len(idx)
        now = utc_now()
        for i, found in zip(idx, results):
            infer_ms[i] = per_image_ms
            n_det[i] = len(found)
            h, w = row["orig_sizes"][i]
            for d in found:
                dets.append(
                    {
                        "run_id": self.spec.run_id,
                        "image_id": row["image_ids"][i],
                        "uri": row["uris"][i],
                        "class_id": d.class_id,
                        "concept": d.concept,
                        "query": d.query,
                        "score": d.score,
                        "box": list(d.box),
                        "mask_rle": d.mask_rle,
                        "mask_size": list(d.mask_size),
                        "area": d.area,
                        "width": int(w),
                        "height": int(h),
                        "model": self.engine.model_id,
                        "created_at": now,
                    }
                )

    def _images_rows(self, row, status, errors, reasons, n_det, infer_ms) -> list[dict]:
        now = utc_now()
        out = []
        for i, uri in enumerate(row["uris"]):
            h, w = row["orig_sizes"][i]
            ok_size = status[i] == "ok" or (h and w)
            out.append(
                {
                    "run_id": self.spec.run_id,
                    "image_id": row["image_ids"][i],
                    "uri": uri,
                    "shard_id": row["shard_id"],
                    "status": status[i],
                    "error": errors[i],
                    "error_reason": reasons[i],
                    "n_detections": n_det[i],
                    "width": int(w) if ok_size else None,
                    "height": int(h) if ok_size else None,
                    "decode_ms": float(row["decode_ms"][i]),
                    "infer_ms": float(infer_ms[i]),
                    "created_at": now,
                }
            )
        return out


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def write_shard(
    row: dict[str, Any], *, output_uri: str, storage_options: dict[str, Any], run_id: str
) -> dict[str, Any]:
    """Write a segmented shard and return its summary (counts only, a few hundred bytes)."""
    det = from_ipc(row["detections_ipc"])
    img = from_ipc(row["images_ipc"])
    return commit_shard(
        row, det, img, output_uri=output_uri, storage_options=storage_options, run_id=run_id
    )


def commit_shard(
    row: dict[str, Any],
    det: pa.Table,
    img: pa.Table,
    *,
    output_uri: str,
    storage_options: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """Write a shard's files and marker (image and video shards alike) and return the
    driver's summary row for it."""
    from sam3ray.output import ShardWriter
    from sam3ray.output_io import Marker

    previous = None
    if row.get("previous_files"):
        previous = Marker(row["shard_id"], "", 0, 0, 0, 0, run_id, tuple(row["previous_files"]), "")
    writer = ShardWriter(output_uri, storage_options)
    # Writing a shard is idempotent (same file names, marker last), so a write that
    # fails transiently (throttling, 5xx, a dropped connection) after the storage
    # client's own retries gave up is redone whole, with a longer backoff.
    marker = retry_transient(
        lambda: writer.write_shard(
            row["shard_id"],
            row["members_hash"],
            det,
            img,
            run_id,
            previous,
            row.get("settings_hash") or "",
        ),
        f"writing shard {row['shard_id']}",
        retries=8,
        base_delay=0.5,
        max_delay=30.0,
    )
    reasons = Counter(r for r in img.column("error_reason").to_pylist() if r)
    per_concept = Counter(det.column("concept").to_pylist())
    return {
        "shard_id": marker.shard_id,
        "n_inputs": marker.n_inputs,
        "n_ok": marker.n_ok,
        "n_error": marker.n_error,
        "n_detections": marker.n_detections,
        "errors_by_reason": json.dumps(dict(reasons)),
        "detections_by_concept": json.dumps(dict(per_concept)),
        "infer_ms": float(sum(v or 0 for v in img.column("infer_ms").to_pylist())),
        "decode_ms": float(sum(v or 0 for v in img.column("decode_ms").to_pylist())),
        "actor_pid": int(row.get("actor_pid", 0)),
        "actor_loads": int(row.get("actor_loads", 0)),
        "finished_at": float(row.get("finished_at") or time.time()),
    }
