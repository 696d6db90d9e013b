"""The README's Python API example runs as written (against the tiny model the demo
writes to ``sam3ray-demo/sam3-tiny.pt``): an example that drifts from the API fails
here, not in a user's notebook."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from sam3ray.core.types import Detection

README = Path(__file__).resolve().parents[2] / "README.md"


def python_api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


def test_the_python_api_example_runs_and_labels(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "sam3ray-demo").mkdir()
    shutil.copy(tiny_checkpoint, tmp_path / "sam3ray-demo" / "sam3-tiny.pt")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(python_api_example(), "README.md:Python API", "exec"), scope)  # noqa: S102
    engine, images = scope["engine"], scope["images"]
    got = engine.predict(images, scope["exemplars"])
    assert len(got) == len(images) and all(isinstance(d, Detection) for d in got[0])
    # What the loop printed is what predict returns, one line per detection.
    assert len(capsys.readouterr().out.splitlines()) == len(got[0])
