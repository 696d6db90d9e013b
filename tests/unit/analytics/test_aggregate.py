"""jobs/aggregate.py end to end on a synthetic output (a subprocess, as a scheduler runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pycocotools.coco import COCO
from test_scan import build_output

SCRIPT = Path(__file__).resolve().parents[3] / "jobs" / "aggregate.py"


def test_aggregate_writes_stats_exports_and_preview(tmp_path):
    syn = build_output(str(tmp_path / "out"), {}, str(tmp_path / "images"))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), syn.output, "--preview", "--per-concept", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(syn.output)
    assert (out / "stats" / "concepts.parquet").is_file()
    assert (out / "stats" / "runs.parquet").is_file()
    exports = out / "exports"
    gt = COCO(str(exports / "coco.json"))
    assert len(gt.anns) == len(syn.detections)
    assert len(gt.loadRes(str(exports / "coco_results.json")).anns) == len(syn.detections)
    tasks = json.loads((exports / "labelstudio.json").read_text(encoding="utf-8"))
    assert len(tasks) == len(syn.ok_images)
    assert (exports / "preview" / "index.html").is_file()

    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "no sam3ray output" in missing.stderr
