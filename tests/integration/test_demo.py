"""``sam3ray demo`` from a directory that is not the repository, as after ``pip install``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pds
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_from_any_directory(tmp_path):
    cwd = tmp_path / "anywhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the package as `pip install -e .` gives it
    cmd = [sys.executable, "-m", "sam3ray.cli", "demo", "--generated", "2",
           "--set", "resources.actors=[1,1]"]  # fmt: skip
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    demo = cwd / "sam3ray-demo"
    assert [p.name for p in cwd.iterdir()] == ["sam3ray-demo"]  # nothing else where it ran
    assert (demo / "sam3-tiny.pt").is_file() and (demo / "concepts.csv").is_file()
    n_images = len(list((demo / "images").iterdir()))
    assert n_images == 12  # the 10 photos + 2 scenes
    config = yaml.safe_load((demo / "config.yaml").read_text())
    assert config["output"]["uri"] == str(demo / "labels")  # absolute: rerun from anywhere
    images = pds.dataset(str(demo / "labels" / "images"), format="parquet").to_table()
    assert images.num_rows == n_images
    assert set(images.column("status").to_pylist()) == {"ok"}
    detections = pds.dataset(str(demo / "labels" / "detections"), format="parquet",
                             partitioning="hive").to_table()  # fmt: skip
    assert detections.num_rows > 0
    assert "Look next" in done.stdout  # and where: the commands name the folder
    assert f"sam3ray stats {demo / 'labels'}" in done.stdout
    assert f"sam3ray run {demo / 'config.yaml'}" in done.stdout
