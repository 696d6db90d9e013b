"""The job's typed configuration: every field described, bounded, and marked when it
decides labels.

A job that would fail an hour in (a typo in a key, a threshold of 4 instead of
0.4) must fail here instead, with a message that names the file and the dotted
field: the models reject unknown keys and bound every number.

Fields that change what a job writes carry ``affects_labels`` metadata (which
paths, ``image`` and/or ``video``). The labelling fingerprint is derived from
that metadata alone (:func:`label_settings`), so a new knob cannot be
forgotten by the resume logic and a speed knob can never trigger a relabel.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from sam3ray.core.uri import is_object_store
from sam3ray.storage.location import Location

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)
_DEFAULT_EXTENSIONS = [
    *(".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"),
    *(".mp4", ".mov", ".mkv", ".webm"),
]
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CKPT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
#: The input kinds a setting can decide labels for.
PATHS = ("image", "video")


def _labels(*paths: str) -> dict[str, Any]:
    """Field metadata: a change of this field relabels inputs of these ``paths``."""
    return {"json_schema_extra": {"affects_labels": list(paths)}}


def is_hub_id(value: str) -> bool:
    """``owner/name`` that is no checkpoint file name (e.g. facebook/sam3)."""
    return bool(_HUB_ID.match(value)) and not value.lower().endswith(_CKPT_SUFFIXES)


class InputConfig(BaseModel):
    model_config = _STRICT
    uris: list[str] = Field([], description="Paths/URIs/globs: local, s3://b/p/**/*.jpg, gs://…")
    manifest: str | list[str] | None = Field(
        None,
        description="Manifest file(s) or glob(s): txt (one URI a line), CSV or Parquet (`uri` "
        "column); many files are read in parallel",
    )
    inventory: str | None = Field(
        None,
        description="S3 Inventory report: its manifest.json, or the folder of an inventory "
        "configuration (the latest dated report is used); CSV, Parquet or ORC",
    )
    storage_options: dict[str, Any] = Field(
        {}, description="fsspec/s3fs options: endpoint_url or client_kwargs, key/secret, anon…"
    )
    extensions: list[str] = Field(
        _DEFAULT_EXTENSIONS, description="Suffixes kept from directory/prefix/glob listings"
    )
    max_pixels: int = Field(178_956_970, ge=1, description="Decompression-bomb limit (w*h)")
    allow_local: bool | None = Field(
        None, description="Local paths allowed? None: only if no uri/manifest is an object store"
    )

    @field_validator("extensions")
    @classmethod
    def _normalize_extensions(cls, v: list[str]) -> list[str]:
        return [("" if e.startswith(".") else ".") + e.lower() for e in v if e]

    @model_validator(mode="after")
    def _need_some_input(self) -> InputConfig:
        if not self.uris and not self.manifest and not self.inventory:
            raise ValueError(
                "at least one of input.uris / input.manifest / input.inventory is required"
            )
        return self

    def manifests(self) -> list[str]:
        """``manifest`` as a list (one file, a glob, or several)."""
        if self.manifest is None:
            return []
        return [self.manifest] if isinstance(self.manifest, str) else list(self.manifest)

    def local_allowed(self) -> bool:
        """Whether local paths may be read: a manifest on S3 must not reach into the host."""
        if self.allow_local is not None:
            return self.allow_local
        sources = [*self.uris, *self.manifests(), *([self.inventory] if self.inventory else [])]
        return not any(is_object_store(u) for u in sources)

    def location(self, uri: str) -> Location:
        """``uri`` read with the input's storage options (images, manifests, tables)."""
        return Location(uri, self.storage_options)


class PromptsConfig(BaseModel):
    model_config = _STRICT
    concepts: str = Field(..., description="Concept table (CSV/Parquet/YAML), path or URI")
    geometric: str | None = Field(None, description="Optional box/point exemplar table")


class ModelConfig(BaseModel):
    model_config = _STRICT
    checkpoint: str = Field(
        ...,
        description="Local path, fsspec URI, or hub id 'facebook/sam3'",
        **_labels("image", "video"),
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute dtype of both models: bfloat16 (image model: bfloat16 weights, "
        "normalisation layers kept float32, under bfloat16 autocast; video model: autocast) "
        "or float32; auto = bfloat16 on CUDA, float32 on CPU (bfloat16 convolutions are slow)",
    )
    compile: bool = Field(
        False, description="torch.compile the vision backbone in each actor (images and videos)"
    )
    cache_dir: str | None = Field(None, description="Where object-store checkpoints are copied")
    storage_options: dict[str, Any] = Field(
        {}, description="fsspec options for the checkpoint; empty = input.storage_options"
    )


class InferenceConfig(BaseModel):
    model_config = _STRICT
    conf: float = Field(
        0.4,
        ge=0,
        le=1,
        description="Score threshold (per-concept overridable with min_score)",
        **_labels("image", "video"),
    )
    iou: float = Field(
        0.7,
        ge=0,
        le=1,
        description="IoU above which two instances of one class are one: box NMS on images, "
        "mean mask IoU between the tracks of a class's synonyms on videos",
        **_labels("image", "video"),
    )
    nms: bool = Field(
        True,
        description="Merge instances of one class (NMS on images, track dedupe on videos)",
        **_labels("image", "video"),
    )
    max_det: int = Field(
        300,
        ge=1,
        description="Most detections kept per concept on an image (per frame on videos), best "
        "scores first; per concept, so adding a concept never changes the others' labels",
        **_labels("image", "video"),
    )
    max_imgsz: int | None = Field(
        None,
        ge=32,
        description="Images only: longest side of the grid masks are stored at. None = the "
        "original pixels (exact); a value caps mask resolution for huge images (mask_size "
        "records the grid; boxes stay in original pixels). The model always sees the "
        "original image resized once to its input size, as Sam3Processor does",
        **_labels("image"),
    )
    images_per_batch: int | Literal["auto"] = Field(
        "auto",
        description="Images per engine call (speed and memory only). auto: sized from the "
        "actor's GPU share (gpus_per_actor × device memory) with activation sizes measured "
        "at actor start; 8 on CPU",
    )
    queries_per_forward: int | Literal["auto"] = Field(
        "auto",
        description="(image, prompt) pairs per grounding forward (speed and memory only). "
        "auto: sized like images_per_batch; 8 on CPU (memory-bound there)",
    )

    @field_validator("images_per_batch", "queries_per_forward")
    @classmethod
    def _positive_or_auto(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


class ResourcesConfig(BaseModel):
    model_config = _STRICT
    gpus_per_actor: float = Field(0.25, ge=0, le=8, description="GPU share of one actor")
    cpus_per_actor: float = Field(1.0, ge=0, description="CPUs reserved by one actor")
    actors: tuple[int, int] = Field((1, 8), description="Actor pool (min, max); n means (n, n)")
    decode_cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs each model actor reserves, on top of cpus_per_actor, for reading "
        "and decoding its shard's images (or video frames) while its model runs",
    )
    decode_threads: int = Field(
        8,
        ge=1,
        description="Threads per image actor that read and decode images ahead of the model "
        "(reads overlap; at most 3 * images_per_batch + decode_threads images are held "
        "decoded: the batch on the device, the next one, the one finishing on the host)",
    )
    ray_address: str | None = Field(None, description="None = local Ray or $RAY_ADDRESS")
    object_store_memory: int | None = Field(None, gt=0, description="Bytes, local Ray only")

    @field_validator("actors", mode="before")
    @classmethod
    def _actors_from_int(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check(self) -> ResourcesConfig:
        lo, hi = self.actors
        if lo < 1 or lo > hi:
            raise ValueError(f"actors must be (min, max) with 1 <= min <= max, got {lo}, {hi}")
        if self.gpus_per_actor > 1 and not float(self.gpus_per_actor).is_integer():
            raise ValueError("gpus_per_actor above 1 must be a whole number (Ray's rule)")
        return self


class OutputConfig(BaseModel):
    model_config = _STRICT
    uri: str = Field(..., description="Output prefix: local dir or s3://bucket/prefix")
    mode: Literal["resume", "overwrite"] = Field(
        "resume",
        description="resume: label only what the output does not hold with the current "
        "settings; overwrite: clear the output first",
    )
    shard_size: int = Field(
        256, ge=1, description="Images per new shard (committed shards are never re-cut)"
    )
    retry_errors: bool = Field(False, description="Redo shards where an input ended in error")
    on_settings_change: Literal["redo", "refuse"] = Field(
        "redo",
        description="Committed labels of a concept whose settings changed (edited concept, "
        "checkpoint, thresholds) or that left the concept table: relabel / drop them, or "
        "refuse to label anything (new concepts and new inputs are always labelled)",
    )
    storage_options: dict[str, Any] = Field({}, description="Empty = input.storage_options")
    max_error_rate: float = Field(1.0, ge=0, le=1, description="Fail when errors/inputs > this")


class VideoConfig(BaseModel):
    model_config = _STRICT
    shard_frames: int = Field(64, ge=1, description="Frames per video shard")
    overlap_frames: int = Field(8, ge=0, description="Frames shared by neighbouring shards")
    frame_stride: int = Field(1, ge=1, description="Use every n-th frame")
    stitch_iou: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Mask IoU to join tracks at overlaps (a change re-stitches, never re-tracks)",
    )
    feature_cache_mib: int = Field(
        4096,
        ge=0,
        description="Memory per actor for keeping frames' image features during a shard, so "
        "every concept reuses them (full SAM 3: ~220 MiB per frame); 0 = recompute per query",
    )

    @model_validator(mode="after")
    def _check(self) -> VideoConfig:
        if self.overlap_frames >= self.shard_frames:
            raise ValueError("overlap_frames must be smaller than shard_frames")
        return self


class PlanConfig(BaseModel):
    """How the job is planned: in this process for small jobs, on the Ray cluster for lakes."""

    model_config = _STRICT
    engine: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="auto: plan in this process until the listing passes local_max_inputs, "
        "then on the Ray cluster (Ray Data), so the driver never holds a large input list",
    )
    local_max_inputs: int = Field(
        200_000, ge=1, description="The most inputs (or tasks) planned in this process"
    )
    images_per_s_per_gpu: float | None = Field(
        None,
        gt=0,
        description="For `sam3ray plan`'s GPU-hours estimate; None: the last run's measured "
        "rate in this output",
    )


class JobConfig(BaseModel):
    model_config = _STRICT
    input: InputConfig = Field(..., description="What to label")
    prompts: PromptsConfig = Field(..., description="Concept and exemplar tables")
    model: ModelConfig = Field(..., description="SAM 3 checkpoint and runtime")
    inference: InferenceConfig = Field(
        default_factory=InferenceConfig, description="Post-processing, batching"
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources")
    output: OutputConfig = Field(..., description="Where results go")
    video: VideoConfig = Field(
        default_factory=VideoConfig, description="Video sharding and stitching"
    )
    plan: PlanConfig = Field(default_factory=PlanConfig, description="Where planning runs")
    run_id: str | None = Field(None, description="[A-Za-z0-9._-]{1,64}; None = generated")
    _source: str | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """An empty optional section (``video:`` with nothing below) means its defaults."""
        if isinstance(data, dict):
            optional = ("inference", "resources", "video", "plan")
            return {k: v for k, v in data.items() if not (v is None and k in optional)}
        return data

    @field_validator("run_id")
    @classmethod
    def _check_run_id(cls, v: str | None) -> str | None:
        if v is not None and (not _RUN_ID.match(v) or v in {".", ".."}):
            raise ValueError(f"run_id {v!r} must match [A-Za-z0-9._-]{{1,64}} (a path part)")
        return v

    @property
    def source(self) -> str | None:
        """The file this config was read from (None when built in code): error messages name it."""
        return self._source

    def with_source(self, source: str | None) -> JobConfig:
        """This config, remembering the file it came from."""
        self._source = source
        return self

    @property
    def output_location(self) -> Location:
        """Where results go; output options fall back to the input's (one bucket, one key)."""
        return Location(self.output.uri, self.output.storage_options or self.input.storage_options)

    @property
    def checkpoint_location(self) -> Location:
        """The checkpoint; model options fall back to the input's."""
        return Location(
            self.model.checkpoint, self.model.storage_options or self.input.storage_options
        )


SECTIONS = ("input", "prompts", "model", "inference", "resources", "output", "video", "plan")


def label_fields(path: str) -> list[tuple[str, str]]:
    """``(section, field)`` of every setting marked as deciding ``path``'s labels."""
    out = []
    for section in SECTIONS:
        model = JobConfig.model_fields[section].annotation
        for name, info in model.model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and path in extra.get("affects_labels", ()):
                out.append((section, name))
    return out


def label_settings(cfg: JobConfig, path: str) -> dict[str, Any]:
    """The values of :func:`label_fields` in ``cfg``, as ``{"section.field": value}``."""
    return {f"{s}.{f}": getattr(getattr(cfg, s), f) for s, f in label_fields(path)}
