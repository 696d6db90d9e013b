"""Per-shard tracking with the official SAM 3 video model.

The model is driven only through its public API (``add_prompt``,
``propagate_in_video``, ``reset_state``), never through
``Sam3VideoPredictorMultiGPU`` (NCCL, CUDA-only). Only session *creation* is
our own: sam3's ``init_state`` loads frames from paths with its own loaders
(which call ``.cuda()``), so :func:`new_inference_state` builds the same
dictionary from frames we decoded ourselves, with the same preprocessing as
``init_state`` on a list of PIL images (square resize, /255, float16, mean/std).

One shard is one session: every query of the concept table runs on it
(``add_prompt`` resets the session per query), and the session is dropped in a
``finally`` so nothing of one shard survives into the next.

The video API takes one text prompt per session, and its detector recomputes a
frame's image features on every visit (each query, and the forward and reverse
passes of a query prompted mid-shard). :func:`shared_image_features` keeps each
frame's features for the length of one shard (within a memory budget), so the
image backbone runs once per frame whatever the number of concepts.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from sam3ray.config.schema import ModelConfig, VideoConfig
from sam3ray.core.types import Detection
from sam3ray.model.device import device_type
from sam3ray.model.video_queries import VideoQuery
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)


_MODEL_DEFAULTS = ModelConfig.model_fields


def frame_to_tensor(rgb: np.ndarray, image_size: int):
    """One H×W×3 uint8 frame as the model's normalised float16 3×S×S tensor.

    Same operations, in the same order, as sam3's ``load_resource_as_video_frames``
    on PIL images, so a session built here equals one built by ``init_state``.
    """
    import torch
    from PIL import Image

    img = np.array(Image.fromarray(rgb).convert("RGB").resize((image_size, image_size)))
    img = torch.from_numpy(img / 255.0).permute(2, 0, 1).to(dtype=torch.float16)
    img -= torch.tensor(_MEAN, dtype=torch.float16)[:, None, None]
    img /= torch.tensor(_STD, dtype=torch.float16)[:, None, None]
    return img


def new_inference_state(model: Any, images: Any, orig_hw: tuple[int, int]) -> dict[str, Any]:
    """``Sam3VideoInference.init_state`` for frames already in a T×3×S×S tensor."""
    state: dict[str, Any] = {
        "image_size": model.image_size,
        "num_frames": len(images),
        "orig_height": int(orig_hw[0]),
        "orig_width": int(orig_hw[1]),
        "constants": {},
    }
    model._construct_initial_input_batch(state, images)
    state.update(
        tracker_inference_states=[],
        tracker_metadata={},
        feature_cache={},
        cached_frame_outputs={},
        action_history=[],
        is_image_only=len(images) == 1,  # as init_state does for a list of frames
    )
    return state


def _share_pos_enc(x: Any, path: str, first: dict[str, Any]) -> tuple[Any, int]:
    """``x`` with positional encodings equal to the first frame's replaced by those
    (they depend on the image size only), and the bytes it adds to the cache."""
    import torch

    if isinstance(x, torch.Tensor):
        if "pos_enc" in path:
            seen = first.setdefault(path, x)
            if seen is not x and seen.shape == x.shape and torch.equal(seen, x):
                return seen, 0
        return x, x.numel() * x.element_size()
    if isinstance(x, dict):
        items = {k: _share_pos_enc(v, f"{path}.{k}", first) for k, v in x.items()}
        return {k: v for k, (v, _) in items.items()}, sum(n for _, n in items.values())
    if isinstance(x, (list, tuple)):
        items = [_share_pos_enc(v, f"{path}[{i}]", first) for i, v in enumerate(x)]
        return type(x)(v for v, _ in items), sum(n for _, n in items)
    return x, 0


@contextlib.contextmanager
def shared_image_features(detector: Any, budget_bytes: int) -> Iterator[dict[str, int]]:
    """Memoise the detector's per-frame image features for one session.

    sam3's ``Sam3Image._get_img_feats`` runs ``backbone.forward_image`` on the
    frames a call asks for when its ``backbone_out`` holds none (the video
    case) and returns them merged into ``backbone_out`` with an ``id_mapping``.
    Here the first visit of a frame keeps exactly those added entries; later
    visits (other queries, the reverse pass) get them back and take sam3's own
    "features available" branch. Only single-frame requests are cached, which is
    what video inference makes.

    Full-size SAM 3 features are large (about 435 MiB per frame in float32,
    half of it positional encodings, which are shared across frames here), so
    frames are cached until ``budget_bytes`` is used; later frames are computed
    per visit as before. Yields live counters (frames, bytes, hits); the cache
    dies with the context (one shard).
    """
    original = detector._get_img_feats
    cache: dict[int, dict[str, Any]] = {}
    first_pos: dict[str, Any] = {}
    stats = {"frames": 0, "bytes": 0, "hits": 0}

    def cached(backbone_out: dict[str, Any], img_ids: Any):
        if "backbone_fpn" in backbone_out or img_ids.numel() != 1:
            return original(backbone_out, img_ids)
        frame = int(img_ids.reshape(-1)[0])
        feats = cache.get(frame)
        if feats is not None:
            stats["hits"] += 1
            return original({**backbone_out, **feats}, img_ids)
        result = original(backbone_out, img_ids)
        if stats["bytes"] < budget_bytes:
            added = {k: v for k, v in result[0].items() if backbone_out.get(k) is not v}
            feats, size = _share_pos_enc(added, "", first_pos)
            if stats["bytes"] + size <= budget_bytes:
                cache[frame] = feats
                stats["frames"] += 1
                stats["bytes"] += size
        return result

    detector._get_img_feats = cached  # instance attribute: shadows the method
    try:
        yield stats
    finally:
        del detector._get_img_feats
        cache.clear()
        first_pos.clear()


def load_video_model(path: str):
    """(model on CPU, Sam3VideoArch, model_id) from a checkpoint in the official layout."""
    from sam3ray.model.loader import CheckpointError, file_sha256, read_checkpoint
    from sam3ray.model.video_arch import Sam3VideoArch, build_video_model

    state, meta = read_checkpoint(path)
    try:
        arch = (
            Sam3VideoArch.from_dict(meta["video_arch"])
            if "video_arch" in meta
            else Sam3VideoArch.full()
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad sam3ray.video_arch ({exc})") from exc
    if not any(k.startswith("tracker.") for k in state):
        raise CheckpointError(
            f"checkpoint {path}: no 'tracker.*' keys: not a SAM 3 video checkpoint"
        )
    model = build_video_model(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the video model: {exc}") from exc
    return model, arch, f"{os.path.basename(path)}@{file_sha256(path)[:12]}"


class VideoTracker:
    """SAM 3 video over one shard at a time; build once per worker."""

    def __init__(
        self,
        model: Any,
        *,
        device: str = _MODEL_DEFAULTS["device"].default,
        dtype: str = _MODEL_DEFAULTS["dtype"].default,
        model_id: str = "sam3-video",
        feature_cache_mib: int = VideoConfig.model_fields["feature_cache_mib"].default,
    ) -> None:
        from sam3ray.model import video_compat
        from sam3ray.model.device import resolve_device, resolve_dtype

        video_compat.ensure()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device).eval()
        self.model_id = model_id
        self.image_size = int(model.image_size)
        self.feature_cache_bytes = int(feature_cache_mib) * 2**20
        self.last_feature_cache: dict[str, int] = {}
        self.sessions = 0

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Location,
        *,
        device: str = _MODEL_DEFAULTS["device"].default,
        dtype: str = _MODEL_DEFAULTS["dtype"].default,
        compile: bool = _MODEL_DEFAULTS["compile"].default,
        cache_dir: str | None = None,
        feature_cache_mib: int = VideoConfig.model_fields["feature_cache_mib"].default,
    ) -> VideoTracker:
        """Load a checkpoint with the tracker (path, ``Location`` or hub id)."""
        from sam3ray.model.loader import resolve_checkpoint

        path = resolve_checkpoint(checkpoint, cache_dir=cache_dir)
        model, _, model_id = load_video_model(path)
        tracker = cls(
            model,
            device=device,
            dtype=dtype,
            model_id=model_id,
            feature_cache_mib=feature_cache_mib,
        )
        if compile:
            tracker.compile()
        return tracker

    @classmethod
    def from_config(
        cls, model: ModelConfig, video: VideoConfig, checkpoint: Location | None = None
    ) -> VideoTracker:
        """The tracker a job's ``model`` and ``video`` sections describe."""
        return cls.from_checkpoint(
            checkpoint or Location(model.checkpoint, model.storage_options),
            device=model.device,
            dtype=model.dtype,
            compile=model.compile,
            cache_dir=model.cache_dir,
            feature_cache_mib=video.feature_cache_mib,
        )

    def compile(self) -> None:
        """torch.compile the detector's vision backbone (fixed frame size; the dominant cost)."""
        import torch

        backbone = self.model.detector.backbone
        backbone.forward_image = torch.compile(backbone.forward_image, dynamic=False)

    def prepare_frame(self, rgb: np.ndarray) -> Any:
        """One decoded H×W×3 uint8 frame as the model's input (see :func:`frame_to_tensor`)."""
        return frame_to_tensor(rgb, self.image_size)

    def track(
        self, frames: Any, orig_hw: tuple[int, int], queries: list[VideoQuery]
    ) -> list[Detection]:
        """Run every query over the frames (a T×3×S×S float16 tensor, or a list of
        :meth:`prepare_frame` results) and return all detections.

        Local track ids are numbered in query order, so they are deterministic.
        """
        import torch

        from sam3ray.model import video_compat

        out: list[Detection] = []
        state = None
        t0 = time.perf_counter()
        shared = (
            shared_image_features(self.model.detector, self.feature_cache_bytes)
            if self.feature_cache_bytes > 0
            else contextlib.nullcontext({})
        )
        # stacked outside the autocast: CPU autocast refuses float16 inputs to stack
        images = torch.stack(frames) if isinstance(frames, list) else frames
        try:
            with video_compat.video_inference(self.device, self.dtype), shared as cache_stats:
                self.last_feature_cache = cache_stats
                # frames are built like sam3's loader (float16); float32 runs upcast them
                images = images.to(self.device)
                if self.dtype == "float32":
                    images = images.to(torch.float32)
                state = new_inference_state(self.model, images, orig_hw)
                self.sessions += 1
                next_track = 0
                for q in queries:
                    found, n_tracks = self._run_query(state, q, orig_hw, next_track)
                    out.extend(found)
                    next_track += n_tracks
        finally:
            del state  # the session (frames, features, memories) must not outlive the shard
            self._release()
        logger.debug("tracked %d frames x %d queries in %.2f s", len(images), len(queries),
                     time.perf_counter() - t0)  # fmt: skip
        return out

    def _run_query(self, state, q: VideoQuery, orig_hw, next_track: int):
        import torch

        h, w = orig_hw
        kwargs: dict[str, Any] = {"text_str": q.text or "visual"}
        if q.boxes:
            kwargs["boxes_xywh"] = torch.tensor(
                [[x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h] for x0, y0, x1, y1, _ in q.boxes]
            )
            kwargs["box_labels"] = torch.tensor([1 if pos else 0 for *_, pos in q.boxes])
        self.model.add_prompt(state, frame_idx=q.frame, **kwargs)
        frames: dict[int, dict[str, Any]] = {}
        self._propagate(state, q.frame, frames)
        if q.points:
            pts = torch.tensor([[x / w, y / h] for x, y, _ in q.points], dtype=torch.float32)
            labels = torch.tensor([1 if pos else 0 for _, _, pos in q.points], dtype=torch.int32)
            new_id = 1 + max(state["tracker_metadata"].get("max_obj_id", -1), 0)
            self.model.add_prompt(
                state, frame_idx=q.frame, points=pts, point_labels=labels, obj_id=new_id
            )
            self._propagate(state, q.frame, frames)
        return self._to_detections(frames, q, orig_hw, next_track)

    def _propagate(self, state, start: int, frames: dict[int, dict[str, Any]]) -> None:
        for reverse in (False, True) if start > 0 else (False,):
            for idx, res in self.model.propagate_in_video(
                state, start_frame_idx=start, max_frame_num_to_track=None, reverse=reverse
            ):
                frames[idx] = res

    def _to_detections(self, frames, q: VideoQuery, orig_hw, next_track: int):
        from sam3ray.core.masks import encode_rle_batch

        h, w = orig_hw
        ids = sorted({int(i) for res in frames.values() for i in res["out_obj_ids"]})
        local = {obj: next_track + n for n, obj in enumerate(ids)}
        out = []
        for idx in sorted(frames):
            res = frames[idx]
            keep = [i for i, p in enumerate(res["out_probs"]) if float(p) >= q.min_score]
            if not keep:
                continue
            rles = encode_rle_batch(res["out_binary_masks"][keep])
            for i, (rle, area) in zip(keep, rles):
                if area == 0:
                    continue
                bx, by, bw, bh = (float(v) for v in res["out_boxes_xywh"][i])
                out.append(Detection(
                    q.class_id, q.concept, q.label, float(res["out_probs"][i]),
                    (bx * w, by * h, (bx + bw) * w, (by + bh) * h), rle, (h, w), area,
                    frame=idx, track=local[int(res["out_obj_ids"][i])],
                ))  # fmt: skip
        return out, len(ids)

    def _release(self) -> None:
        """Free what a session allocated (Python cycles, CUDA cache) before the next shard."""
        import torch

        gc.collect()
        if device_type(self.device) == "cuda":
            torch.cuda.empty_cache()
