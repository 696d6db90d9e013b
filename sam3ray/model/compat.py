"""Every workaround sam3ray needs to run the official ``sam3`` 0.1.4 code off-GPU.

One place, one comment per problem, so that each can be deleted when upstream
fixes it. ``ensure()`` is idempotent and must run before ``sam3`` is imported
(it imports torchvision, which ``sam3`` imports at module level).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading

import torch

from sam3ray.model.postprocess import box_iou

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_done = False
# torch.library.Library objects unregister their ops when garbage-collected.
_torchvision_lib: torch.library.Library | None = None


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS in plain torch with torchvision.ops.nms semantics (indices, score order)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order].float(), boxes[order].float())
    n = order.numel()
    suppressed = torch.zeros(n, dtype=torch.bool)
    over = (iou > iou_threshold).cpu()
    keep: list[int] = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def _patch_torchvision_ops() -> None:
    """torchvision's PyPI wheel is CUDA-built; with the CPU torch wheel its ``_C``
    extension fails to load and ``import torchvision`` then raises "operator
    torchvision::nms does not exist" (its fake-kernel registrations assume the op
    schemas exist). Define the two schemas, give ``nms`` a plain-torch CPU kernel,
    and import again. Upstream: pytorch/vision CPU/CUDA wheel mismatch."""
    global _torchvision_lib
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms_reference, "CPU")
    _torchvision_lib = lib
    import torchvision  # noqa: F401

    logger.info("torchvision C++ ops unavailable: using sam3ray's CPU nms kernel")


def _patch_roi_align_eager() -> None:
    """Without torchvision's C++ ops, ``roi_align`` (used by sam3's geometry
    encoder for box exemplars) falls back to a pure-Python version wrapped in a
    lazy ``torch.compile``; on CPU that first call compiles for seconds (6.4 s
    vs 0.65 s measured). Run the same Python function eagerly instead of
    disabling dynamo for the whole process, so ``model.compile`` still works."""
    import torchvision.ops.roi_align  # noqa: F401  (the package re-exports a function of the same name)
    from torchvision.extension import _has_ops

    roi_mod = sys.modules["torchvision.ops.roi_align"]
    if _has_ops():
        return
    fn = roi_mod._roi_align
    roi_mod._roi_align = getattr(fn, "__wrapped__", fn)


def _patch_pin_memory() -> None:
    """sam3's ``SequenceGeometryEncoder._encode_boxes`` calls
    ``tensor.pin_memory()`` unconditionally, which raises on machines without
    an accelerator (facebookresearch/sam3 #587/#588). Pinning is meaningless
    there, so make it the identity only when no accelerator exists."""
    if torch.cuda.is_available() or getattr(torch.Tensor.pin_memory, "_sam3ray", False):
        return
    original = torch.Tensor.pin_memory

    def pin_memory(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.cuda.is_available():
            return original(self, *args, **kwargs)
        return self

    pin_memory._sam3ray = True  # type: ignore[attr-defined]
    torch.Tensor.pin_memory = pin_memory  # type: ignore[method-assign]


def bpe_path() -> str:
    """The sam3 0.1.4 wheel omits its BPE vocabulary (``assets/bpe_simple_vocab_16e6.txt.gz``).
    ``open_clip_torch`` ships a byte-identical file (sha256 924691ac…804a); locate it
    without importing open_clip (which imports torchvision eagerly)."""
    override = os.environ.get("SAM3RAY_BPE_PATH")
    if override:
        return override
    spec = importlib.util.find_spec("sam3")
    if spec and spec.submodule_search_locations:
        own = os.path.join(
            list(spec.submodule_search_locations)[0], "..", "assets", "bpe_simple_vocab_16e6.txt.gz"
        )
        if os.path.exists(own):
            return os.path.normpath(own)
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        path = os.path.join(
            list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz"
        )
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        "SAM 3's BPE vocabulary was not found: install open_clip_torch or set SAM3RAY_BPE_PATH"
    )


def ensure() -> None:
    """Apply all workarounds once per process (safe to call from every actor)."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        _patch_torchvision_ops()
        _patch_roi_align_eager()
        _patch_pin_memory()
        _done = True
