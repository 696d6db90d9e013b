"""Find, fetch and load a SAM 3 checkpoint into the official image model.

A checkpoint is named by a local path, an fsspec URI (``s3://``, ``gs://``...:
copied once per node into a cache directory under a file lock, so the actors
sharing a node download it once) or the hub id ``facebook/sam3``. Loading is
strict in the way that matters: a missing file, an unreadable file or a state
dict that does not fit the architecture raises ``CheckpointError`` naming the
path and the problem; a model with random weights is never returned silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam3ray.model.arch import Sam3Arch
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

HUB_ID = "facebook/sam3"
#: Key under which sam3ray stores metadata inside a checkpoint (official layout otherwise).
META_KEY = "sam3ray"
#: Checkpoint keys the image model legitimately does not use.
_IGNORED_PREFIXES = ("backbone.vision_backbone.sam2_convs.", "inst_interactive_predictor.")


class CheckpointError(ValueError):
    """The checkpoint cannot be found, read, or does not fit the model."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: str
    arch: Sam3Arch
    model_id: str  # "<file name>@<sha256 prefix>", recorded in every output row


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAM3RAY_CACHE", Path.home() / ".cache" / "sam3ray"))


def resolve_checkpoint(
    checkpoint: str | Location, cache_dir: str | os.PathLike | None = None
) -> str:
    """Return a local file path for ``checkpoint``, downloading it at most once per node.

    A plain string is read without storage options; pass a ``Location`` to give them.
    """
    loc = checkpoint if isinstance(checkpoint, Location) else Location(checkpoint)
    uri = loc.uri
    if uri == HUB_ID or uri.startswith("hf://"):
        return _from_hub(uri)
    if loc.is_local:
        path = Path(loc.path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {uri}: no such file")
        return str(Path(uri.removeprefix("file://")).expanduser())
    return _from_object_store(loc, Path(cache_dir or default_cache_dir()))


def _from_hub(checkpoint: str) -> str:
    repo = HUB_ID if checkpoint == HUB_ID else checkpoint[len("hf://") :]
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo_id=repo, filename="config.json")
        return hf_hub_download(repo_id=repo, filename="sam3.pt")
    except Exception as exc:  # offline, gated, no token: one readable message
        raise CheckpointError(
            f"checkpoint {checkpoint}: could not download from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). The SAM 3 weights are gated: accept the licence, "
            "set HF_TOKEN, or copy sam3.pt to a path or bucket and point model.checkpoint at it."
        ) from exc


def _from_object_store(loc: Location, cache_dir: Path) -> str:
    from filelock import FileLock

    uri = loc.uri
    digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
    local = cache_dir / f"{digest}-{os.path.basename(uri.rstrip('/')) or 'checkpoint.pt'}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock", timeout=3600):
        fs, path = loc.fs, loc.path
        try:
            info = fs.info(path)
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint {uri}: no such object") from exc
        except Exception as exc:
            raise CheckpointError(f"checkpoint {uri}: cannot read ({exc})") from exc
        size = info.get("size")
        if local.is_file() and (size is None or local.stat().st_size == size):
            return str(local)
        tmp = local.with_suffix(local.suffix + ".part")
        logger.info("copying checkpoint %s -> %s (%s bytes)", uri, local, size)
        fs.get(path, str(tmp))
        os.replace(tmp, local)
    return str(local)


def file_sha256(path: str) -> str:
    """sha256 of a file, cached in a sidecar keyed by size and mtime (a 3.4 GB
    checkpoint takes seconds to hash; actors on one node share the sidecar)."""
    st = os.stat(path)
    key = f"{st.st_size}:{int(st.st_mtime)}"
    sidecar = path + ".sha256.json"
    try:
        with open(sidecar) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        with open(sidecar, "w") as f:
            json.dump({"key": key, "sha256": digest}, f)
    except OSError:
        pass
    return digest


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict in the official ``detector.``/``tracker.`` layout, sam3ray metadata)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch checkpoint ({exc})"
        ) from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    meta = ckpt.get(META_KEY) if isinstance(ckpt.get(META_KEY), dict) else {}
    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    return state, meta


def _detector_part(state: dict[str, Any], path: str) -> dict[str, Any]:
    detector = {k[len("detector.") :]: v for k, v in state.items() if k.startswith("detector.")}
    if not detector:
        raise CheckpointError(
            f"checkpoint {path}: no 'detector.*' keys ({len(state)} keys in all); "
            "is this a SAM 3 checkpoint?"
        )
    return detector


def load_image_weights(model: Any, state: dict[str, Any], path: str) -> None:
    """Load the ``detector.`` part of an official checkpoint, failing loudly on misfit."""
    detector = _detector_part(state, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(detector))
    unexpected = sorted(
        k for k in set(detector) - set(expected) if not k.startswith(_IGNORED_PREFIXES)
    )
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in detector.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[:2]})")
        raise CheckpointError(
            f"checkpoint {path} does not fit the SAM 3 image model: " + "; ".join(parts)
        )
    model.load_state_dict({k: v for k, v in detector.items() if k in expected}, strict=True)


def load_checkpoint_into_new_model(path: str) -> tuple[Any, LoadedCheckpoint]:
    """Rebuild the architecture recorded in the checkpoint (default: full size) and load it."""
    from sam3ray.model.arch import build_image_model

    state, meta = read_checkpoint(path)
    _detector_part(state, path)  # refuse a foreign dict before building 840 M params
    try:
        arch = Sam3Arch.from_dict(meta["arch"]) if "arch" in meta else Sam3Arch.full()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad sam3ray.arch metadata ({exc})") from exc
    model = build_image_model(arch)
    load_image_weights(model, state, path)
    model_id = f"{os.path.basename(path)}@{file_sha256(path)[:12]}"
    return model, LoadedCheckpoint(path=path, arch=arch, model_id=model_id)
