"""Typed job configuration, validated in full before ``ray.init``.

A job that would fail an hour in (a typo in a key, a threshold of 4 instead of
0.4, an output prefix inside the input prefix) must fail here instead, with a
message that names the file and the dotted field. The models therefore reject
unknown keys and bound every number. Path checks that touch storage live in
:func:`validate_paths` so that parsing stays side-effect free.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from sam3ray.inputs import has_scheme, is_object_store

logger = logging.getLogger(__name__)

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)
_DEFAULT_EXTENSIONS = [
    *(".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"),
    *(".mp4", ".mov", ".mkv", ".webm"),
]
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CKPT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
_GLOB_CHARS = re.compile(r"[*?\[]")


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the dotted field."""


class InputConfig(BaseModel):
    model_config = _STRICT
    uris: list[str] = Field([], description="Paths/URIs/globs: local, s3://b/p/**/*.jpg, gs://…")
    manifest: str | None = Field(None, description="txt (one URI a line), CSV or Parquet (`uri`)")
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
        if not self.uris and not self.manifest:
            raise ValueError("at least one of input.uris / input.manifest is required")
        return self

    def local_allowed(self) -> bool:
        """Whether local paths may be read: a manifest on S3 must not reach into the host."""
        if self.allow_local is not None:
            return self.allow_local
        sources = [*self.uris, *([self.manifest] if self.manifest else [])]
        return not any(is_object_store(u) for u in sources)


class PromptsConfig(BaseModel):
    model_config = _STRICT
    concepts: str = Field(..., description="Concept table (CSV/Parquet/YAML), path or URI")
    geometric: str | None = Field(None, description="Optional box/point exemplar table")


class ModelConfig(BaseModel):
    model_config = _STRICT
    checkpoint: str = Field(..., description="Local path, fsspec URI, or hub id 'facebook/sam3'")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present")
    dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="Inference dtype")
    compile: bool = Field(False, description="torch.compile the model in each actor")
    cache_dir: str | None = Field(None, description="Where object-store checkpoints are copied")
    storage_options: dict[str, Any] = Field(
        {}, description="fsspec options for the checkpoint; empty = input.storage_options"
    )


class InferenceConfig(BaseModel):
    model_config = _STRICT
    conf: float = Field(0.4, ge=0, le=1, description="Score threshold (per-concept overridable)")
    iou: float = Field(0.7, ge=0, le=1, description="NMS IoU threshold within a class")
    nms: bool = Field(True, description="Apply per-class NMS")
    max_det: int = Field(300, ge=1, description="Most detections kept per image")
    max_imgsz: int = Field(1036, ge=32, description="Long side above which images are resized")
    images_per_batch: int = Field(8, ge=1, description="Images per actor call")
    queries_per_forward: int = Field(64, ge=1, description="(image, prompt) pairs per forward")


class ResourcesConfig(BaseModel):
    model_config = _STRICT
    gpus_per_actor: float = Field(0.25, ge=0, le=8, description="GPU share of one actor")
    cpus_per_actor: float = Field(1.0, ge=0, description="CPUs reserved by one actor")
    actors: tuple[int, int] = Field((1, 8), description="Actor pool (min, max); n means (n, n)")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task")
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
    mode: Literal["resume", "overwrite"] = Field("resume", description="Skip or redo done shards")
    shard_size: int = Field(256, ge=1, description="Target images per shard")
    retry_errors: bool = Field(False, description="On resume, redo inputs that ended in error")
    on_settings_change: Literal["redo", "refuse"] = Field(
        "redo",
        description="On resume, shards labelled with other concepts, checkpoint or "
        "thresholds: relabel them, or refuse to start",
    )
    storage_options: dict[str, Any] = Field({}, description="Empty = input.storage_options")
    max_error_rate: float = Field(1.0, ge=0, le=1, description="Fail when errors/inputs > this")

    def effective_storage_options(self, input_options: Mapping[str, Any]) -> dict[str, Any]:
        """Output options, falling back to the input's: usually one bucket, one credential."""
        return dict(self.storage_options or input_options)


class VideoConfig(BaseModel):
    model_config = _STRICT
    shard_frames: int = Field(64, ge=1, description="Frames per video shard")
    overlap_frames: int = Field(8, ge=0, description="Frames shared by neighbouring shards")
    frame_stride: int = Field(1, ge=1, description="Use every n-th frame")
    stitch_iou: float = Field(0.5, ge=0, le=1, description="Mask IoU to join tracks at overlaps")
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
    run_id: str | None = Field(None, description="[A-Za-z0-9._-]{1,64}; None = generated")
    _source: str | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """An empty optional section (``video:`` with nothing below) means its defaults."""
        if isinstance(data, dict):
            optional = ("inference", "resources", "video")
            return {k: v for k, v in data.items() if not (v is None and k in optional)}
        return data

    @field_validator("run_id")
    @classmethod
    def _check_run_id(cls, v: str | None) -> str | None:
        if v is not None and (not _RUN_ID.match(v) or v in {".", ".."}):
            raise ValueError(f"run_id {v!r} must match [A-Za-z0-9._-]{{1,64}} (a path part)")
        return v

    @property
    def output_storage_options(self) -> dict[str, Any]:
        return self.output.effective_storage_options(self.input.storage_options)

    @property
    def model_storage_options(self) -> dict[str, Any]:
        return dict(self.model.storage_options or self.input.storage_options)


def _fmt_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":  # most likely a typo: show what is allowed
            model: Any = JobConfig
            for part in e["loc"][:-1]:
                model = JobConfig.model_fields[part].annotation if model is JobConfig else None
            if model is not None:
                msg += f" (allowed: {', '.join(model.model_fields)})"
        lines.append(f"{source}: {_fmt_loc(e['loc'])}: {msg}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
        node = data
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or an empty section ("video:")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        node[parts[-1]] = value
    return data


def _resolve_local(value: Any, base: Path, *, hub_ok: bool = False) -> Any:
    """Absolute path for a relative local path: cwd first, the config's dir as fallback.

    Users type paths relative to where they run the CLI; a config shipped with its
    tables next to it should still work from elsewhere. Ray workers need absolute paths.
    """
    if not isinstance(value, str) or not value or has_scheme(value):
        return value
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return path

    def exists(p: str) -> bool:
        if _GLOB_CHARS.search(p):  # lazily: a huge folder must not be walked in full
            return next(glob.iglob(p, recursive=True), None) is not None
        return os.path.exists(p)

    if not exists(path) and exists(str(base / path)):
        return str((base / path).absolute())
    if hub_ok and not exists(path) and is_hub_id(value):
        return value
    return os.path.abspath(path)


def is_hub_id(value: str) -> bool:
    """``owner/name`` that is no local file and no checkpoint file name (e.g. facebook/sam3)."""
    return bool(_HUB_ID.match(value)) and not value.lower().endswith(_CKPT_SUFFIXES)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    sections = {k: data.get(k) for k in ("input", "prompts", "model", "output")}
    inp, prompts, model, output = (s if isinstance(s, dict) else None for s in sections.values())
    if inp is not None:
        if isinstance(inp.get("uris"), list):
            inp["uris"] = [_resolve_local(u, base) for u in inp["uris"]]
        if "manifest" in inp:
            inp["manifest"] = _resolve_local(inp["manifest"], base)
    for section, keys in ((prompts, ("concepts", "geometric")), (output, ("uri",))):
        for key in keys if section is not None else ():
            if key in section:
                section[key] = _resolve_local(section[key], base)
    if model is not None:
        if "checkpoint" in model:
            model["checkpoint"] = _resolve_local(model["checkpoint"], base, hub_ok=True)
        if "cache_dir" in model:
            model["cache_dir"] = _resolve_local(model["cache_dir"], base)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML job file, apply ``--set`` overrides, resolve paths, validate."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _resolve_paths(data, Path(path).resolve().parent)
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    cfg._source = source
    return cfg
