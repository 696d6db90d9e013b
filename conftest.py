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
