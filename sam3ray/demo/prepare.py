"""What ``sam3ray demo`` needs before it runs: the tiny checkpoint and sample images."""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = "configs/local-demo.yaml"
DEMO_CHECKPOINT = "artifacts/sam3-tiny.pt"
DEMO_IMAGES = "artifacts/sample-images"


class DemoError(RuntimeError):
    """The demo cannot run from here."""


def prepare_demo() -> None:
    """Create the tiny checkpoint and the sample images once (idempotent)."""
    from sam3ray.demo.images import write_sample_images
    from sam3ray.model.tiny import make_tiny_checkpoint

    if not Path(DEMO_CONFIG).is_file():
        raise DemoError(f"run the demo from the repository root ({DEMO_CONFIG} not found)")
    if not Path(DEMO_CHECKPOINT).is_file():
        make_tiny_checkpoint(DEMO_CHECKPOINT, seed=0)
    if not Path(DEMO_IMAGES).is_dir():
        write_sample_images(DEMO_IMAGES)
