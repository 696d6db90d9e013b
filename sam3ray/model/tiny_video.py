"""A tiny SAM 3 *video* model with random weights, built from the real ``sam3`` classes.

Same reason as ``tiny.py``: tests, the demo and the benchmarks must run the
official video code path (detector + tracker + their heuristics) on a CPU in
well under a second per frame. The checkpoint uses the official layout
(``{"model": {"detector.<k>", "tracker.<k>"}}``); the ``sam3ray`` entry holds
``arch`` (the detector's ``Sam3Arch``, so the image loader can use the same
file) and ``video_arch`` (the full ``Sam3VideoArch``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sam3ray.model.tiny import init_uninitialised, save_checkpoint, spread_scores
from sam3ray.model.video_arch import Sam3VideoArch, build_video_model

logger = logging.getLogger(__name__)

VIDEO_KIND = "tiny-random-video"


def build_tiny_video_model(seed: int = 0, resolution: int = 336, num_queries: int = 8):
    """(model, arch) with deterministic random weights for ``seed``."""
    import torch

    arch = Sam3VideoArch.tiny(resolution=resolution, num_queries=num_queries)
    torch.manual_seed(seed)
    model = build_video_model(arch)
    gen = torch.Generator().manual_seed(seed + 1)
    init_uninitialised(model.detector, gen)
    spread_scores(model.detector, gen)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"tiny video model has non-finite parameters: {bad}")
    return model, arch


def make_tiny_video_checkpoint(
    out: str | os.PathLike, seed: int = 0, resolution: int = 336, num_queries: int = 8
) -> Path:
    """Write a tiny video checkpoint to ``out`` (atomically) and return its path.

    This is what ``sam3ray make-tiny-checkpoint --video`` calls.
    """
    model, arch = build_tiny_video_model(seed, resolution, num_queries)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {
        "arch": arch.detector.to_dict(),
        "video_arch": arch.to_dict(),
        "kind": VIDEO_KIND,
        "seed": seed,
    }
    return save_checkpoint(state, meta, out, "tiny SAM 3 video")
