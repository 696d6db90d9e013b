"""A tiny SAM 3 with random weights, built from the real ``sam3`` classes.

The released weights are gated and 3.4 GB; tests, the demo and the benchmarks
need a model that runs the very same code paths on a CPU in milliseconds. The
checkpoint is written in the official layout (``{"model": {"detector.<k>": ...}}``)
plus a ``sam3ray`` entry holding the architecture, so the one loader rebuilds
the right size for the tiny and the released model alike.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from sam3ray.model.arch import Sam3Arch, build_image_model
from sam3ray.model.loader import META_KEY

logger = logging.getLogger(__name__)


def init_uninitialised(model, generator) -> None:
    """Give values to the parameters sam3 creates with ``torch.empty``.

    Upstream only ever overwrites them from a checkpoint; left alone they hold
    whatever memory held (NaN or huge values) and every score turns NaN. The
    same applies to the full-size model built without a checkpoint.
    """
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("positional_embedding"):
                p.normal_(0.0, 0.01, generator=generator)
            elif name.endswith("text_projection"):
                p.normal_(0.0, p.shape[0] ** -0.5, generator=generator)
            elif name.endswith("level_embed"):
                p.normal_(0.0, 1.0, generator=generator)


def spread_scores(model, generator) -> None:
    """Random weights put every score near 0.5·0.5; widen the logits so that the
    tiny model yields a realistic mix of confident and rejected detections."""
    import torch

    with torch.no_grad():
        head = model.transformer.decoder.presence_token_head.layers[-1]
        head.bias.fill_(2.0)  # presence ≈ 0.88: the concept is "present"
        scorer = model.dot_prod_scoring
        for layer in (scorer.hs_proj, scorer.prompt_proj):
            layer.weight.mul_(4.0)


def build_tiny_model(seed: int = 0, resolution: int = 336):
    """(model, arch) with deterministic random weights for ``seed``."""
    import torch

    arch = Sam3Arch.tiny(resolution=resolution)
    torch.manual_seed(seed)
    model = build_image_model(arch)
    gen = torch.Generator().manual_seed(seed + 1)
    init_uninitialised(model, gen)
    spread_scores(model, gen)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"tiny model has non-finite parameters: {bad}")
    return model, arch


def make_tiny_checkpoint(out: str | os.PathLike, seed: int = 0, resolution: int = 336) -> Path:
    """Write a tiny checkpoint to ``out`` (atomically) and return its path."""

    model, arch = build_tiny_model(seed=seed, resolution=resolution)
    state = {f"detector.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"arch": arch.to_dict(), "kind": "tiny-random", "seed": seed}
    return save_checkpoint(state, meta, out, "tiny SAM 3")


def save_checkpoint(state: dict, meta: dict, out: str | os.PathLike, what: str) -> Path:
    """Write ``{"model": state, "sam3ray": meta}`` (the official layout plus our
    metadata) atomically, so a half-written file never looks like a checkpoint."""
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({"model": state, META_KEY: meta}, tmp)
    os.replace(tmp, out)
    n = sum(math.prod(v.shape) for v in state.values())
    logger.info(
        "wrote %s checkpoint %s (%.1f M parameters, seed %s)", what, out, n / 1e6, meta.get("seed")
    )
    return out
