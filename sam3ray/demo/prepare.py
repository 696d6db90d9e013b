"""What ``sam3ray demo`` needs, in a folder of its own: config, concepts, model, images.

Why a folder of its own: after ``pip install sam3ray`` there is no repository to
run from, so everything the demo reads ships inside the package
(``sam3ray/demo/data/``) and everything it makes goes under one folder
(``./sam3ray-demo/`` unless told otherwise), wherever the command runs::

    sam3ray-demo/
      config.yaml     the demo job (package copy, paths made absolute: rerun it anywhere)
      concepts.csv    the concept table
      sam3-tiny.pt    the tiny random-weight SAM 3
      images/         sample photos and synthetic scenes
      labels/         the job's output

Files that exist are kept (an edited ``config.yaml`` survives a rerun).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

DEMO_DIR = "sam3ray-demo"


class DemoError(RuntimeError):
    """The demo cannot be prepared there (e.g. the folder is a file)."""


@dataclass(frozen=True)
class DemoFiles:
    """Where the demo's files are (absolute paths)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def concepts(self) -> Path:
        return self.root / "concepts.csv"

    @property
    def checkpoint(self) -> Path:
        return self.root / "sam3-tiny.pt"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def labels(self) -> Path:
        return self.root / "labels"


def packaged(name: str) -> str:
    """A file of ``sam3ray/demo/data/`` as text (it ships in the wheel)."""
    return (resources.files("sam3ray.demo") / "data" / name).read_text(encoding="utf-8")


def demo_config(files: DemoFiles) -> str:
    """The packaged demo job with its paths pointing into ``files.root``."""
    data = yaml.safe_load(packaged("demo.yaml"))
    data["input"]["uris"] = [str(files.images)]
    data["prompts"]["concepts"] = str(files.concepts)
    data["model"]["checkpoint"] = str(files.checkpoint)
    data["output"]["uri"] = str(files.labels)
    header = "".join(line + "\n" for line in packaged("demo.yaml").splitlines()
                     if line.startswith("#"))  # fmt: skip
    return header + yaml.safe_dump(data, sort_keys=False)


def prepare_demo(root: str | Path = DEMO_DIR, *, n_generated: int = 24) -> DemoFiles:
    """Create what is missing under ``root`` (idempotent) and return where it is."""
    from sam3ray.demo.images import write_sample_images
    from sam3ray.model.tiny import make_tiny_checkpoint

    files = DemoFiles(Path(root).expanduser().resolve())
    try:
        files.root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise DemoError(f"cannot use {files.root} for the demo: {exc}") from None
    if not files.concepts.is_file():
        files.concepts.write_text(packaged("concepts.csv"), encoding="utf-8")
    if not files.config.is_file():
        files.config.write_text(demo_config(files), encoding="utf-8")
    if not files.checkpoint.is_file():
        make_tiny_checkpoint(files.checkpoint, seed=0)
    if not files.images.is_dir():
        write_sample_images(files.images, n_generated=n_generated)
    logger.info("demo files in %s", files.root)
    return files
