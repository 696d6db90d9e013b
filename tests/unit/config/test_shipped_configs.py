"""Every config the project ships validates against JobConfig (paths not checked:
the production ones name buckets that exist only for their users)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sam3ray.config import JobConfig

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"local-demo.yaml", "s3-images.yaml", "videos.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = JobConfig.model_validate(yaml.safe_load(path.read_text()))
    lo, hi = cfg.resources.actors
    assert 1 <= lo <= hi
