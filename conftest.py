"""Model fixtures shared by every test tier (unit, integration, gpu).

The tiny SAM 3 checkpoint is built once per test session from the real sam3
classes with random weights (seed 0) and saved in the official layout.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TORCHVISION_WARN_WHEN_EXTENSION_LOADING_FAILS", "")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from sam3ray.model.tiny import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "sam3-tiny.pt"
    return str(make_tiny_checkpoint(path, seed=0))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """A loaded tiny ``Sam3Image`` shared read-only by tests (inference only)."""
    from sam3ray import load_sam3_image_model

    return load_sam3_image_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def video_ckpt(tmp_path_factory) -> str:
    """A tiny SAM 3 video checkpoint (random weights, seed 0), built once per session."""
    from sam3ray.model.tiny_video import make_tiny_video_checkpoint

    return str(make_tiny_video_checkpoint(tmp_path_factory.mktemp("vckpt") / "v.pt", seed=0))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a test module (``pytestmark = usefixtures``): on two
    shared cores more threads oversubscribe and stall."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def meta_device():
    """A context that builds modules on the meta device (no memory, no time), also
    sam3's official builders, whose caches hard-code ``device="cuda"``: every explicit
    ``device=`` becomes "meta"; small ``linspace``/``arange`` stay on CPU because
    module constructors call ``.item()`` on them."""
    import contextlib

    import torch
    from torch.overrides import TorchFunctionMode

    class OnMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if kwargs.get("device") is not None:
                kwargs["device"] = "meta"
            elif func in (torch.linspace, torch.arange):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    @contextlib.contextmanager
    def ctx():
        with torch.device("meta"), OnMeta():
            yield

    return ctx
