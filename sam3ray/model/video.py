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
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3ray.model.video_queries import VideoQuery

logger = logging.getLogger(__name__)

_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TrackedDetection:
    """One object on one frame of a shard (``frame`` is the shard-local index)."""

    frame: int
    track: int  # shard-local track id, unique across the shard's queries
    class_id: str
    concept: str
    query: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
    mask_rle: bytes
    mask_size: tuple[int, int]
    area: int


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

    def __init__(self, model: Any, *, device: str = "cpu", model_id: str = "sam3-video") -> None:
        from sam3ray.model import video_compat
        from sam3ray.model.engine import resolve_device

        video_compat.ensure()
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.model_id = model_id
        self.image_size = int(model.image_size)
        self.sessions = 0

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        *,
        device: str = "auto",
        cache_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> VideoTracker:
        from sam3ray.model.loader import resolve_checkpoint

        path = resolve_checkpoint(checkpoint, cache_dir=cache_dir, storage_options=storage_options)
        model, _, model_id = load_video_model(path)
        return cls(model, device=device, model_id=model_id)

    def track(
        self, images: Any, orig_hw: tuple[int, int], queries: list[VideoQuery]
    ) -> list[TrackedDetection]:
        """Run every query over the frames (T×3×S×S float16) and return all detections.

        Local track ids are numbered in query order, so they are deterministic.
        """
        from sam3ray.model import video_compat

        out: list[TrackedDetection] = []
        state = None
        t0 = time.perf_counter()
        try:
            with video_compat.video_inference(self.device):
                state = new_inference_state(self.model, images.to(self.device), orig_hw)
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
        if q.box is not None:
            x0, y0, x1, y1 = q.box
            kwargs["boxes_xywh"] = torch.tensor([[x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h]])
            kwargs["box_labels"] = torch.tensor([1])
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
        from sam3ray.masks import encode_rle_batch

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
                out.append(TrackedDetection(
                    idx, local[int(res["out_obj_ids"][i])], q.class_id, q.concept, q.label,
                    float(res["out_probs"][i]), (bx * w, by * h, (bx + bw) * w, (by + bh) * h),
                    rle, (h, w), area,
                ))  # fmt: skip
        return out, len(ids)

    def _release(self) -> None:
        """Free what a session allocated (Python cycles, CUDA cache) before the next shard."""
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
