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


def test_repository_demo_config_is_the_packaged_demo():
    """configs/local-demo.yaml (from a checkout) and the demo that ships in the package
    run the same job: the same settings, the same concept table, only the paths differ."""
    from sam3ray.demo.prepare import packaged

    repo = yaml.safe_load((ROOT / "configs" / "local-demo.yaml").read_text())
    shipped = yaml.safe_load(packaged("demo.yaml"))
    for cfg in (repo, shipped):
        cfg["input"].pop("uris"), cfg["prompts"].pop("concepts"), cfg["output"].pop("uri")
        cfg["model"].pop("checkpoint")
    assert repo == shipped
    assert (ROOT / "configs" / "concepts-demo.csv").read_text() == packaged("concepts.csv")


def test_demo_config_points_into_the_demo_folder(tmp_path):
    from sam3ray.config import load_config
    from sam3ray.demo.prepare import DemoFiles, demo_config

    files = DemoFiles(tmp_path / "d")
    files.root.mkdir()
    files.config.write_text(demo_config(files))
    files.concepts.write_text("x")
    cfg = load_config(files.config)
    assert cfg.output.uri == str(files.labels) and cfg.input.uris == [str(files.images)]
    assert cfg.model.checkpoint == str(files.checkpoint)
    assert cfg.prompts.concepts == str(files.concepts)
