"""SAM 3 labelling as one step of a user's own Ray Data pipeline (``sam3ray.label``).

Data teams already hold their images in tables (Delta, Iceberg, Lance, Parquet)
read by Ray Data, filtered and deduplicated their own way; they need labels as
one more operator, the way ``ray.data.llm``'s processors fit in, not a job that
lists a bucket. :func:`label` takes their dataset and the job's own config
sections and returns a lazy dataset of detection rows::

    labels = sam3ray.label(ds, column="uri", concepts="concepts.csv",
                           model=ModelConfig(checkpoint="s3://models/sam3.pt"),
                           keep=["asset_id"])
    labels.write_parquet("s3://lake/labels/", partition_cols=["class_id"])

It runs the job's own pieces: an autoscaling pool of fractional-GPU actors that
load SAM 3 once (``setup()`` in the constructor, as ``runner.adapter`` does) reads
and decodes each batch's inputs in ``resources.decode_threads`` threads with the
job's decoder (``sources.images.decode_image``: EXIF, colour modes, size limit),
at most ``decode_threads + images_per_batch`` inputs ahead of the model as the
job's ``ImageReader`` does (so the next model batch decodes while one runs), and
labels them as they come with the job's ``SegmentStage``, which builds rows with
the job's row builders (``stages.rows``). So a row here equals the job's row for
the same image.

Output rows (:data:`LABEL_SCHEMA` plus the ``keep`` columns, repeated per row):

- one row per detection: the job's detections columns (``output.schema``), with
  ``status = "ok"`` and null ``error`` / ``error_reason``;
- one row per input that could not be labelled (unreadable, not an image, too
  large, a bad array, inference failed on it alone): ``status = "error"``,
  ``error`` and ``error_reason`` as in the job's images table, ``run_id``,
  ``image_id``, ``uri``, ``model`` set and every detection field null. One bad
  input costs one row, never the dataset. Written with
  ``partition_cols=["class_id"]`` they land in ``class_id=__HIVE_DEFAULT_PARTITION__/``,
  which pyarrow, DuckDB and Spark read back as a null ``class_id``;
- an image without detections gives no row (there is no images table here).

Rows carry what the user's dataset holds (URIs, encoded bytes, or arrays), never
decoded pixels made on the way: the actor decodes, and the engine does the one
resize to the model's input itself, so labels do not depend on how rows are cut.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from sam3ray.config.schema import (
    InferenceConfig,
    InputConfig,
    ModelConfig,
    ResourcesConfig,
    is_hub_id,
)
from sam3ray.core.errors import ConfigError, DecodeError, error_reason, error_text
from sam3ray.core.ids import input_id
from sam3ray.core.shards import Shard
from sam3ray.core.types import Concept, ConceptSet
from sam3ray.core.uri import canonical_input
from sam3ray.output.schema import DETECTIONS_SCHEMA
from sam3ray.plan.job import new_run_id
from sam3ray.runner.cluster import gpu_share
from sam3ray.runner.metrics import RayMetrics
from sam3ray.sources.images import decode_image
from sam3ray.sources.prompts import load_concepts
from sam3ray.stages.decode import DecodedImage, prefetch
from sam3ray.stages.segment import SegmentStage
from sam3ray.stages.tasks import ShardTask
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

Kind = Literal["uri", "bytes", "array"]
KINDS: tuple[str, ...] = ("uri", "bytes", "array")

#: The job's detections columns, then the status of the input the row speaks for.
LABEL_SCHEMA = pa.schema(
    [
        *DETECTIONS_SCHEMA,
        pa.field("status", pa.string()),  # ok | error
        pa.field("error", pa.string()),
        pa.field("error_reason", pa.string()),  # as in the job's images table
    ]
)
_MAX_PIXELS = InputConfig.model_fields["max_pixels"].default


def label(
    ds: ray.data.Dataset,
    *,
    column: str,
    concepts: str | ConceptSet | Sequence[Concept],
    model: ModelConfig,
    kind: Kind = "uri",
    inference: InferenceConfig | None = None,
    resources: ResourcesConfig | None = None,
    keep: Sequence[str] = (),
    uri_column: str | None = None,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = _MAX_PIXELS,
    run_id: str | None = None,
    batch_size: int = 32,
) -> ray.data.Dataset:
    """``ds`` labelled by SAM 3: a lazy dataset of detection and error rows (module doc).

    ``column`` holds the images: URIs (``kind="uri"``: local paths, ``s3://``,
    ``gs://``, read with ``storage_options``), encoded bytes (``"bytes"``) or
    H×W×3 uint8 RGB arrays (``"array"``). ``keep`` names the input's own key
    columns to carry into every output row. ``image_id`` and ``uri`` are the
    job's (``input_id`` of the canonical URI), so labels join with a job's
    output; for bytes and arrays ``uri_column`` names a column with each
    input's URI (made canonical the same way), else ``uri`` is
    ``sha1:<hex of the content>``.

    ``concepts`` is a concept table (path or URI, as ``prompts.concepts``), a
    ``ConceptSet`` or a list of ``Concept``; ``model``, ``inference`` and
    ``resources`` are the job's sections (``resources.ray_address`` and
    ``object_store_memory`` are the caller's Ray's business and ignored).
    ``batch_size`` rows go to an actor at a time (the engine batches them by
    ``inference.images_per_batch``). Raises ``ConfigError`` before any work for a
    bad table, a missing checkpoint, ``model.device: cuda`` on a cluster without GPUs, or columns
    that are missing or would collide with output columns.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    inference = inference or InferenceConfig()
    resources = resources or ResourcesConfig()
    options = dict(storage_options or {})
    keep = list(dict.fromkeys(keep))
    _check_columns(ds, column, keep, uri_column)
    concept_set = _concepts(concepts, options)
    checkpoint = Location(model.checkpoint, model.storage_options or options)
    _check_checkpoint(model, checkpoint)
    if not ray.is_initialized():  # Ray Data would start one on execution; the checks need it now
        ray.init()
    num_gpus = gpu_share(resources, model)
    # The inputs come from the caller's dataset: no listing, only the read settings.
    source = InputConfig.model_construct(storage_options=options, max_pixels=max_pixels)
    stage = SegmentStage(
        model,
        inference,
        source,
        resources,
        concept_set,
        run_id=run_id or new_run_id(),
        checkpoint=checkpoint,
        metrics=RayMetrics(),
    )
    lo, hi = stage.resources.actors
    actor = type(stage.name, (_LabelActor,), {})  # Ray Data shows MapBatches(segment)
    read = {"column": column, "kind": kind, "uri_column": uri_column}
    return ds.map_batches(
        actor,
        fn_constructor_args=(stage, keep, read),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_gpus=num_gpus,
        num_cpus=stage.resources.cpus,
    )


# -- checks on the driver (before any work) ------------------------------------------------


def _check_columns(
    ds: ray.data.Dataset, column: str, keep: list[str], uri_column: str | None
) -> None:
    taken = sorted(set(keep) & set(LABEL_SCHEMA.names))
    if taken:
        raise ConfigError(
            f"keep: {taken} would collide with output columns of the same name; rename them "
            "first (ds.rename_columns)"
        )
    schema = ds.schema(fetch_if_missing=False)  # known without running for most readers
    if schema is None:
        return  # checked per batch instead (a KeyError naming the column)
    names = set(schema.names)
    wanted = [column, *keep, *([uri_column] if uri_column else [])]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ConfigError(f"columns {missing} are not in the dataset (it has {sorted(names)})")


def _concepts(concepts: Any, options: dict[str, Any]) -> ConceptSet:
    if isinstance(concepts, str):
        return load_concepts(Location(concepts, options))  # PromptTableError names the row
    found = concepts if isinstance(concepts, ConceptSet) else ConceptSet(tuple(concepts))
    if len(found) == 0:
        raise ConfigError("concepts: the concept set is empty: give at least one concept")
    return found


def _check_checkpoint(model: ModelConfig, checkpoint: Location) -> None:
    if is_hub_id(model.checkpoint) or model.checkpoint.startswith("hf://"):
        return
    try:
        found = checkpoint.exists()
    except Exception as exc:  # credentials, network, a missing fsspec backend
        raise ConfigError(f"model.checkpoint: cannot check {checkpoint.uri}: {exc}") from None
    if not found:
        raise ConfigError(f"model.checkpoint: not found: {checkpoint.uri}")


# -- reading inputs (in the actor, ahead of the model) ------------------------------------


def _column_values(batch: pa.Table, column: str, kind: str) -> list[Any]:
    if kind != "array":
        return batch.column(column).to_pylist()
    from ray.data.block import BlockAccessor

    # Ray's tensor columns (fixed or variable shape) as numpy, one array per row.
    arrays = BlockAccessor.for_block(batch.select([column])).to_numpy(column)
    return list(arrays)


def decode_input(
    value: Any,
    kind: str,
    uri: str | None = None,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = _MAX_PIXELS,
) -> DecodedImage:
    """One input as the segment stage takes it: full-size RGB pixels, or why there are none.

    Why full size: the engine resizes to the model's input in one step; shipping
    a shrunk copy would make the labels depend on the decode path. Never raises:
    a value that cannot even be named (``uri`` stays ``""``) is one error row too.
    """
    t0 = time.perf_counter()
    name = ""
    try:
        name = _input_uri(value, kind, uri)
        if value is None or (kind == "uri" and not value):
            raise DecodeError("empty", f"the {kind} column is null or empty")
        if kind == "uri":
            data = Location(name, storage_options or {}).read_bytes()
            pixels = decode_image(data, max_pixels=max_pixels)
        elif kind == "bytes":
            pixels = decode_image(_encoded(value), max_pixels=max_pixels)
        else:
            pixels = _rgb_array(value, max_pixels)
    except Exception as exc:  # one bad input must not cost its batch-mates
        ms = (time.perf_counter() - t0) * 1000
        return DecodedImage(
            name, input_id(name), None, None, ms, error_text(exc), error_reason(exc)
        )
    h, w = pixels.shape[:2]
    return DecodedImage(name, input_id(name), pixels, (h, w), (time.perf_counter() - t0) * 1000)


def decode_inputs(
    values: Sequence[Any],
    uris: Sequence[str | None],
    kind: str,
    *,
    threads: int,
    window: int,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = _MAX_PIXELS,
) -> Iterator[DecodedImage]:
    """:func:`decode_input` of each value (``uris[i]`` names ``values[i]``), in order,
    decoded in ``threads`` threads at most ``window`` inputs ahead of the consumer.

    Why a generator: the segment stage labels each batch of images as soon as
    it has one, so decoding overlaps the model and decoded originals do not
    wait for the whole Ray batch. Close it (or exhaust it) to stop the threads.
    """

    def one(value: Any, uri: str | None) -> DecodedImage:
        return decode_input(value, kind, uri, storage_options, max_pixels)

    return prefetch(one, zip(values, uris, strict=True), threads=threads, window=window)


def _input_uri(value: Any, kind: str, uri: str | None) -> str:
    """The job's URI of an input: canonical (as listings return it, so ``image_id``
    joins with a job's output), else ``sha1:<hex>`` of its content, else ``""``."""
    if kind == "uri":
        return canonical_input(str(value)) if value else ""
    if uri:
        return canonical_input(str(uri))
    return _content_uri(value, kind) if value is not None else ""


def _content_uri(value: Any, kind: str) -> str:
    """``sha1:<hex>`` of an input's content (bytes, or an array's shape, dtype and bytes)."""
    digest = hashlib.sha1()
    if kind == "array":
        arr = np.asarray(value)
        digest.update(f"{arr.shape}{arr.dtype}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    else:
        digest.update(_encoded(value))
    return f"sha1:{digest.hexdigest()}"


def _encoded(value: Any) -> bytes:
    """An encoded file's bytes; anything else (a str column read as bytes, a number) is
    ``unsupported``, not silently bytes (``bytes(5)`` is five zero bytes)."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise DecodeError("unsupported", f"expected encoded bytes, got {type(value).__name__}")
    return bytes(value)


def _rgb_array(value: Any, max_pixels: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DecodeError(
            "unsupported", f"expected an H×W×3 uint8 RGB array, got {arr.dtype} {arr.shape}"
        )
    h, w = arr.shape[:2]
    if h < 1 or w < 1:
        raise DecodeError("empty", f"array of shape {arr.shape}")
    if h * w > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds {max_pixels}")
    return np.ascontiguousarray(arr)


# -- the actors (SAM 3 once per actor) -----------------------------------------------------


class _LabelActor:
    """One ``SegmentStage`` per actor, set up (model loaded) in the constructor."""

    def __init__(self, stage: SegmentStage, keep: list[str], read: dict[str, Any]) -> None:
        self.stage = stage
        self.keep = keep
        self.read = read
        stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        kind, uri_column = self.read["kind"], self.read["uri_column"]
        values = _column_values(batch, self.read["column"], kind)
        uris = batch.column(uri_column).to_pylist() if uri_column else [None] * batch.num_rows
        stage, source = self.stage, self.stage.source
        # As the job's ImageReader: the next model batch decodes while this one runs.
        items = decode_inputs(
            values,
            uris,
            kind,
            threads=stage.decode_threads,
            window=stage.decode_threads + stage.images_per_batch(),
            storage_options=source.storage_options,
            max_pixels=source.max_pixels,
        )
        with closing(items):  # a failed batch stops its decode threads at once
            return label_items(stage, items, batch.select(self.keep))


def label_items(stage: SegmentStage, items: Iterable[DecodedImage], keep: pa.Table) -> pa.Table:
    """Label decoded inputs with ``stage`` (set up) and return the output rows.

    ``items`` is consumed lazily (a generator such as :func:`decode_inputs` is
    labelled as it decodes), keeping only each input's ``image_id``. The
    stage sees the batch as one shard whose inputs are named by position, so the
    same image twice in a batch keeps its own rows; the real ids go back in
    afterwards. ``keep`` (one row per item) is repeated for each output row.
    """
    image_ids: list[str] = []  # per position; the stage's rows carry each uri themselves

    def by_position() -> Iterator[DecodedImage]:
        for i, item in enumerate(items):
            image_ids.append(item.image_id)
            yield replace(item, image_id=str(i))

    # The inputs are known only as they decode, so the shard lists none; its id
    # is internal (the output has no shard_id column).
    shard = Shard("op-" + uuid.uuid4().hex[:16], "image", (), ())
    task = ShardTask(shard, tuple(c.class_id for c in stage.concepts), ())
    result = stage.label(task, by_position())
    if len(image_ids) != keep.num_rows:
        raise ValueError(f"{len(image_ids)} inputs for {keep.num_rows} rows of key columns")
    ids = pa.array(image_ids, pa.string())
    det = result.detections
    det_pos = pc.cast(det.column("image_id"), pa.int64()).combine_chunks()
    n = det.num_rows
    det = det.set_column(det.schema.get_field_index("image_id"), "image_id", ids.take(det_pos))
    det = det.append_column("status", pa.array(["ok"] * n, pa.string()))
    det = det.append_column("error", pa.nulls(n, pa.string()))
    det = det.append_column("error_reason", pa.nulls(n, pa.string()))
    errors, err_pos = [], []
    model_id = stage.engine.model_id
    for row in result.images.to_pylist():
        if row["status"] != "error":
            continue
        pos = int(row["image_id"])
        err_pos.append(pos)
        errors.append({"run_id": row["run_id"], "image_id": image_ids[pos],
                       "uri": row["uri"], "width": row["width"], "height": row["height"],
                       "model": model_id, "created_at": row["created_at"], "status": "error",
                       "error": row["error"], "error_reason": row["error_reason"]})  # fmt: skip
    out = pa.concat_tables([det.cast(LABEL_SCHEMA), pa.Table.from_pylist(errors, LABEL_SCHEMA)])
    source = pa.concat_arrays([det_pos, pa.array(err_pos, pa.int64())])
    for name in keep.column_names:
        out = out.append_column(keep.schema.field(name), keep.column(name).take(source))
    return out
