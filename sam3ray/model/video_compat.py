"""Workarounds the official ``sam3`` 0.1.4 *video* path needs off-GPU.

The image-path workarounds live in ``compat.py`` (and are applied here too);
this module holds the video ones, one comment per upstream problem, so that
each can be deleted when upstream fixes it. Everything is scoped: the device
shim and autocast are context managers used only around sam3 video calls,
and the one patched function checks its input before deferring to upstream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

from sam3ray.model import compat
from sam3ray.model.device import device_type

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_done = False


def _is_cuda(value: object) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and device_type(value) == "cuda"


class CudaToCpu(TorchFunctionMode):
    """Run code that hard-codes CUDA on the CPU.

    Upstream problem (facebookresearch/sam3 #587/#588): the tracker calls
    ``.cuda()`` on memory features and previous mask logits
    (``sam3_tracker_base.py`` ~657/664, ``sam3_tracking_predictor.py`` ~303/1026)
    and its ``init_state`` stores ``storage_device=torch.device("cuda")`` unless
    state offloading is on, which the video model never turns on. Rewriting
    those call sites would fork sam3; mapping every CUDA device argument to the
    CPU inside this mode keeps the official code path byte for byte. Only used
    when the model runs on CPU.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and any(_is_cuda(a) for a in args[1:]):
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _patch_empty_hole_filling() -> None:
    """``fill_holes_in_mask_scores`` runs connected components on its input even
    when there is no mask at all (a frame where nothing was detected or tracked
    gives an ``N=0`` tensor); the CPU fallback then raises "stack expects a
    non-empty TensorList" (checked on sam3 0.1.4). Nothing to fill in an empty
    batch: return it unchanged.
    Upstream: sam3 ``sam3_tracker_utils.fill_holes_in_mask_scores``."""
    import sam3.model.sam3_tracker_utils as utils

    original = utils.fill_holes_in_mask_scores
    if getattr(original, "_sam3ray", False):
        return

    def fill_holes_in_mask_scores(mask, max_area, *args, **kwargs):
        if mask.numel() == 0:
            return mask
        return original(mask, max_area, *args, **kwargs)

    fill_holes_in_mask_scores._sam3ray = True  # type: ignore[attr-defined]
    utils.fill_holes_in_mask_scores = fill_holes_in_mask_scores
    # the video modules imported the name directly: rebind it there too
    import sam3.model.sam3_tracking_predictor as predictor
    import sam3.model.sam3_video_base as base
    import sam3.model.sam3_video_inference as inference

    for module in (base, inference, predictor):
        module.fill_holes_in_mask_scores = fill_holes_in_mask_scores


def _silence_progress_bars() -> None:
    """sam3 wraps every propagation loop in a tqdm bar (``propagate_in_video``, per
    query per shard): in Ray actors that floods the driver's log with carriage
    returns. Rebind the name in those modules to a pass-through, unless
    ``SAM3RAY_PROGRESS=1``. Upstream: sam3 ``sam3_video_inference``/``sam3_tracking_predictor``."""
    if os.environ.get("SAM3RAY_PROGRESS") == "1":
        return
    import sam3.model.sam3_tracking_predictor as predictor
    import sam3.model.sam3_video_inference as inference

    def quiet(iterable=None, *args, **kwargs):
        return iterable

    for module in (inference, predictor):
        module.tqdm = quiet


def ensure() -> None:
    """Apply the process-wide video workarounds once (after ``compat.ensure``)."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        compat.ensure()
        _patch_empty_hole_filling()
        _silence_progress_bars()
        _done = True


class Bfloat16AsFloat32(TorchFunctionMode):
    """Keep a float32 run in float32.

    Upstream problem: the tracker stores memory features as bfloat16 by explicit
    casts (``maskmem_features.to(torch.bfloat16)``, ``sam3_tracking_predictor.py``
    ~1098/1149) and relies on the bf16 autocast it enters on CUDA to mix them
    with float32 weights; without autocast those casts end in "Input type
    (BFloat16) and bias type (float)". On CPU, bfloat16 convolutions are far
    slower than float32, so ``model.dtype: float32`` maps every bfloat16 cast to
    float32 instead: the same code path, in one dtype.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") is torch.bfloat16:
            kwargs["dtype"] = torch.float32
        if func is torch.Tensor.bfloat16:
            return args[0].float()
        if func is torch.Tensor.to and any(a is torch.bfloat16 for a in args[1:]):
            args = tuple(torch.float32 if a is torch.bfloat16 else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def video_inference(device: str | torch.device, dtype: str = "bfloat16") -> Iterator[None]:
    """The context every sam3 video call runs in.

    Upstream builds its frames in float16 and relies on the bf16 CUDA autocast
    that ``Sam3TrackerPredictor.__init__`` enters globally (and thread-locally)
    at construction; on CPU that autocast is a no-op and the float16 frames meet
    float32 conv weights ("mixed dtype" errors). So, for ``bfloat16``: bf16
    autocast on the model's device type, entered explicitly per call (Ray may
    call an actor from another thread than the one that built it); for
    ``float32``: no autocast, float32 frames (the caller's) and
    :class:`Bfloat16AsFloat32`; plus ``CudaToCpu`` on CPU.
    """
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if dtype == "bfloat16":
            stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        else:
            # the CUDA autocast upstream entered at construction must not apply either
            if device.type == "cuda":
                stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
            stack.enter_context(Bfloat16AsFloat32())
        if device.type == "cpu":
            stack.enter_context(CudaToCpu())
        yield
