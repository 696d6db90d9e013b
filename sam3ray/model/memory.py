"""Memory you can plan: activation sizes measured on the real model, batch sizes from them.

Why measured, not guessed: a grounding pack of full SAM 3 keeps ``pred_masks`` of
queries × 200 × 288 × 288 alive, plus per-query copies of the fused image features;
how much exactly depends on the architecture, the dtype and the attention kernels.
So the engine measures, once per actor, what one more image in a batch and one
more query in a pack cost on its own device (:func:`measure_activations`), and
:func:`plan_batches` sizes ``images_per_batch`` and ``queries_per_forward`` to the
actor's share of the device (``gpus_per_actor`` × device memory).

Meters: on CUDA the allocator's peak (``max_memory_allocated``); elsewhere
:class:`LiveBytes`, which counts the storages torch creates while it is active
(what a test on the CPU and the full-size benchmark use).
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)

#: Device memory a CUDA process holds outside the allocator (context, cuBLAS/cuDNN
#: workspaces); not visible to max_memory_allocated.
CUDA_CONTEXT_BYTES = 1 << 30
#: Fraction of the share left unplanned (allocator fragmentation, candidate masks).
SAFETY = 0.8
#: Largest automatic sizes: beyond these a GPU gains nothing and latency grows.
MAX_AUTO_IMAGES = 32
MAX_AUTO_QUERIES = 512


@dataclass(frozen=True)
class ActivationSizes:
    """Bytes a batch needs on top of the weights, measured on the model itself.

    ``per_image``: one more image in a batch (backbone activations and the
    features kept for the batch's packs). ``per_query``: one more (image, prompt)
    pair in a grounding pack. ``fixed``: what any pack needs besides that.
    """

    per_image: int
    per_query: int
    fixed: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class BatchPlan:
    """The batch sizes an engine uses, and where they came from."""

    images_per_batch: int
    queries_per_forward: int
    reason: str
    budget_bytes: int | None = None
    sizes: ActivationSizes | None = None


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (weights and inputs made
    before are not counted). A storage counts until the last tensor that came out of
    an op on it is garbage collected; outputs that alias an input (views) add nothing.
    Approximate by design: it sees what Python sees, enough to size batches.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[tuple[int, int], list[int]] = {}
        self.current = 0
        self._peak = 0
        self._base = 0

    def reset_peak(self) -> None:
        """Start a measurement: :attr:`peak` counts from what is alive now."""
        self._peak = self._base = self.current

    @property
    def peak(self) -> int:
        """Most bytes alive since :meth:`reset_peak`, beyond what was alive then."""
        return self._peak - self._base

    def _release(self, key: tuple[int, int]) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            _storage_key(t)
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = _storage_key(t)
            if key[1] == 0 or (key in inputs and key not in self._live):
                continue  # a view of something made before: no new memory
            entry = self._live.get(key)
            if entry is None:
                entry = self._live[key] = [key[1], 0]
                self.current += key[1]
                self._peak = max(self._peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _CudaPeak:
    """The CUDA allocator's peak since :meth:`reset_peak`, beyond what was allocated then."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self._base = 0

    def __enter__(self) -> _CudaPeak:
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    @property
    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self._base


def meter_for(device: str) -> Any:
    """The meter :func:`measure_activations` uses on ``device``."""
    return _CudaPeak(device) if torch.device(device).type == "cuda" else LiveBytes()


def measure_activations(engine: Any, meter: Any = None) -> ActivationSizes:
    """Measure ``engine``'s activation sizes with real forwards at its input size.

    Backbone on 2 and 1 blank images (per image = the difference of the peaks,
    which includes the features a batch keeps), then grounding packs of 1 and 3
    queries on the one image (per query = half the difference; ``fixed`` = the rest
    of the 1-query pack). The queries use the engine's first concept text;
    exemplars add little (a few boxes). Costs three small forwards.
    """
    meter = meter or meter_for(engine.device)
    res = engine.resolution
    text = next(t for c in engine.concepts for t in (c.texts or ("visual",)))
    with torch.inference_mode(), engine.autocast():
        engine.encode_texts({text})
        feats, mask = engine.text_features(text)
        peaks = {}
        with meter:
            out: dict[str, Any] = {}
            for n in (2, 1):  # the 1-image features stay for the packs
                out.clear()
                meter.reset_peak()
                pixels = torch.zeros((n, 3, res, res), device=engine.device)
                out = engine.model.backbone.forward_image(pixels)
                peaks[f"images{n}"] = meter.peak
                del pixels
            for q in (1, 3):
                meter.reset_peak()
                ids = torch.zeros(q, dtype=torch.long, device=engine.device)
                result = engine.forward_pack(out, ids, ids, feats, mask)
                peaks[f"queries{q}"] = meter.peak
                del result
    per_image = max(1, peaks["images2"] - peaks["images1"])
    per_query = max(1, (peaks["queries3"] - peaks["queries1"]) // 2)
    fixed = max(0, peaks["queries1"] - per_query)
    sizes = ActivationSizes(per_image=per_image, per_query=per_query, fixed=fixed)
    logger.info("activation sizes at %d px: %s", res, sizes)
    return sizes


def device_budget(device: str, share: float) -> int:
    """Bytes this actor may use for activations: its share of the device, less what is
    already allocated (the weights), the CUDA context and a safety margin."""
    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    share = min(1.0, share) if share > 0 else 1.0
    used = torch.cuda.memory_allocated(dev)
    return max(0, int((total * share - used - CUDA_CONTEXT_BYTES) * SAFETY))


def plan_batches(
    sizes: ActivationSizes,
    budget: int,
    queries_per_image: int,
    images_per_batch: int | str = "auto",
    queries_per_forward: int | str = "auto",
    *,
    mask_bytes: int = 0,
) -> BatchPlan:
    """Batch sizes that fit ``budget`` bytes of activations.

    A batch holds ``images × per_image`` (its backbone features live until its last
    pack) plus one pack (``fixed + queries × per_query``) plus the mask
    post-processing buffers (``mask_bytes``). Automatic images take at most half of
    the budget (so packs stay large); automatic queries take the rest, never more
    than the batch can fill (``images × queries_per_image``). Explicit values are
    kept as given (an out-of-memory error then splits the batch).
    """
    room = budget - sizes.fixed - mask_bytes
    if images_per_batch == "auto":
        want_q = sizes.per_query * (1 if queries_per_forward == "auto" else queries_per_forward)
        half = room // 2 if queries_per_forward == "auto" else room - want_q
        images = max(1, min(MAX_AUTO_IMAGES, half // max(1, sizes.per_image)))
    else:
        images = int(images_per_batch)
    if queries_per_forward == "auto":
        left = room - images * sizes.per_image
        cap = max(1, min(MAX_AUTO_QUERIES, images * max(1, queries_per_image)))
        queries = max(1, min(cap, left // max(1, sizes.per_query)))
    else:
        queries = int(queries_per_forward)
    need = images * sizes.per_image + sizes.fixed + queries * sizes.per_query + mask_bytes
    reason = f"{math.ceil(need / 2**20)} MiB of {budget // 2**20} MiB planned"
    if need > budget:
        reason += " (over budget: explicit sizes or a model too large for this share)"
    return BatchPlan(images, queries, reason, budget, sizes)
