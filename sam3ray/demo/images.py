"""Sample images for the demo and the tests, made without a network.

Real photographs come from scikit-image's wheel (a dependency already: the
video path uses it), so the demo labels real cats, astronauts and rockets;
synthetic scenes (shapes on gradients, deterministic per seed) add volume
and cover sizes and aspect ratios the photos do not.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

#: Photographs that ship inside scikit-image's wheel (no download needed).
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "camera.png",
    "horse.png",
    "coins.png",
)


def synthetic_scene(seed: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """An H×W×3 uint8 scene: a colour gradient with a few rectangles and ellipses."""
    rng = np.random.default_rng(seed)
    h, w = size or (int(rng.integers(160, 480)), int(rng.integers(160, 480)))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [(xx / max(w - 1, 1)) * 255, (yy / max(h - 1, 1)) * 255, np.full((h, w), 96.0)], axis=-1
    )
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1 = int(min(w - 1, x0 + rng.integers(15, max(16, w // 2))))
        y1 = int(min(h - 1, y0 + rng.integers(15, max(16, h // 2))))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return np.asarray(img)


def write_sample_images(out: str | os.PathLike, n_generated: int = 24) -> list[Path]:
    """Copy the photos and write ``n_generated`` scenes into ``out``; return the paths."""
    import skimage

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(skimage.__file__).parent / "data"
    paths = []
    for name in PHOTOS:
        src = data_dir / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            paths.append(out / name)
        else:
            logger.warning("scikit-image photo %s not found; skipped", name)
    for i in range(n_generated):
        path = out / f"scene-{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(synthetic_scene(i)).save(path, quality=90)
        paths.append(path)
    logger.info("wrote %d sample images to %s", len(paths), out)
    return paths
