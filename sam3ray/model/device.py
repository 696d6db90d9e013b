"""Where and in what precision the model runs, and what its failures mean.

Small decisions every model user needs (the image engine, the video model, the
segment stage's out-of-memory handling), kept apart from either model so they
agree on ``auto`` and on what counts as running out of memory.
"""

from __future__ import annotations

from typing import Any


def device_type(device: str) -> str:
    """``cuda`` for ``cuda`` and ``cuda:1`` alike: every decision here is by kind."""
    return device.split(":", 1)[0]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_type(device) == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {device!r} but no CUDA device is visible")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``model.dtype`` on a resolved device: auto is bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if device_type(device) == "cuda" else "float32"
    return dtype


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator running out of memory (CUDA, or any device's)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def to_bfloat16_weights(model: Any) -> Any:
    """Cast ``model``'s floating-point parameters to bfloat16 in place, normalisation
    layers excepted; buffers (position encodings, complex RoPE tables) stay as built.

    Halves the weights' memory (full SAM 3: 3.4 → 1.7 GB). Norm layers stay
    float32: autocast computes them in float32 anyway (on CUDA it would cast
    the bf16-rounded weights back up), and on CPU a float32 activation meets
    a bf16 LayerNorm weight as a dtype error. They hold < 0.1% of the weights.
    """
    import torch

    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms):
                continue
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != torch.bfloat16:
                    param.data = param.data.to(torch.bfloat16)
    return model
