"""Small jobs for the fault tests: configs, generated inputs, output readers, Ray clean-up.

The fault tests compare a disturbed run with an undisturbed one, so everything a
run's output depends on (inputs, shard size, batch size, thresholds) is fixed
here. One concept with one text keeps inference cheap on two CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image

from sam3ray.config import JobConfig
from sam3ray.sample_data import synthetic_scene

THING = "3f0b6a52-7c1e-4d2a-9b8f-1e2d3c4b5a60"
CONCEPTS_CSV = f"class_id,name,text\n{THING},thing,object\n"

INFERENCE: dict[str, Any] = {
    "conf": 0.3,
    "iou": 0.7,
    "nms": True,
    "max_det": 8,
    "max_imgsz": 128,
    "images_per_batch": 2,
    "queries_per_forward": 8,
}


def scene_png(seed: int, size: tuple[int, int] = (72, 96)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_scene(seed, size)).save(buf, "PNG")
    return buf.getvalue()


def write_concepts(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "concepts.csv"
    path.write_text(CONCEPTS_CSV, encoding="utf-8")
    return str(path)


def job_dict(
    *,
    concepts: str,
    checkpoint: str,
    output: str,
    uris: list[str] | None = None,
    manifest: str | None = None,
    storage_options: dict[str, Any] | None = None,
    shard_size: int = 1,
    actors: tuple[int, int] = (1, 1),
    **output_extra: Any,
) -> dict[str, Any]:
    """A JobConfig as plain data (YAML-able for the CLI)."""
    return {
        "input": {
            "uris": list(uris or []),
            "manifest": manifest,
            "storage_options": storage_options or {},
        },
        "prompts": {"concepts": concepts},
        "model": {"checkpoint": checkpoint, "device": "cpu", "dtype": "float32"},
        "inference": dict(INFERENCE),
        "resources": {
            "gpus_per_actor": 0,
            "cpus_per_actor": 1,
            "actors": list(actors),
            "decode_cpus": 0.25,
            "object_store_memory": 200 * 1024 * 1024,
        },
        "output": {"uri": output, "shard_size": shard_size, **output_extra},
    }


def job_config(**kw: Any) -> JobConfig:
    return JobConfig.model_validate(job_dict(**kw))


# -- reading outputs ----------------------------------------------------------------------


def read_tables(root: str, filesystem: Any = None) -> tuple[pa.Table, pa.Table]:
    """(images, detections) with plain pyarrow.dataset readers (hidden files skipped)."""
    images = ds.dataset(f"{root}/images", format="parquet", filesystem=filesystem).to_table()
    det_dir = f"{root}/detections"
    exists = (
        os.path.isdir(det_dir)
        if filesystem is None
        else filesystem.get_file_info(det_dir).type.name == "Directory"
    )
    if not exists:
        return images, pa.table({"image_id": pa.array([], pa.string())})
    detections = ds.dataset(
        det_dir, format="parquet", partitioning="hive", filesystem=filesystem
    ).to_table()
    return images, detections


def detection_keys(detections: pa.Table) -> Counter:
    """A multiset of detections, exact up to float rounding; run ids and times left out."""
    if detections.num_rows == 0:
        return Counter()
    cols = ["image_id", "class_id", "score", "box", "mask_rle", "mask_size", "area"]
    keys = Counter()
    for r in detections.select(cols).to_pylist():
        keys[
            (
                r["image_id"],
                str(r["class_id"]),
                round(float(r["score"]), 5),
                tuple(round(float(v), 2) for v in r["box"]),
                bytes(r["mask_rle"]),
                tuple(r["mask_size"]),
                r["area"],
            )
        ] += 1
    return keys


def image_rows(images: pa.Table) -> dict[str, dict[str, Any]]:
    """uri -> images row; fails if any uri appears twice (exactly once per input)."""
    rows = images.to_pylist()
    counts = Counter(r["uri"] for r in rows)
    dup = [u for u, n in counts.items() if n > 1]
    assert not dup, f"inputs listed more than once: {dup}"
    return {r["uri"]: r for r in rows}


def outcome(images: pa.Table) -> dict[str, tuple[Any, ...]]:
    """uri -> (status, error_reason, n_detections, width, height): what a run concluded."""
    return {
        u: (r["status"], r["error_reason"], r["n_detections"], r["width"], r["height"])
        for u, r in image_rows(images).items()
    }


def assert_committed_files_whole(root: Path) -> int:
    """Every marker's files exist and parse, with the row counts the marker promises;
    every visible Parquet file parses. Returns the number of markers."""
    import json

    markers = sorted((root / "_markers").glob("*.json")) if (root / "_markers").is_dir() else []
    for m in markers:
        marker = json.loads(m.read_text())
        n_img = n_det = 0
        for rel in marker["files"]:
            table = pq.read_table(root / rel)
            if rel.startswith("images/"):
                n_img += table.num_rows
            else:
                n_det += table.num_rows
        assert (n_img, n_det) == (marker["n_inputs"], marker["n_detections"]), m.name
    for sub in ("images", "detections"):
        for path in (root / sub).rglob("*.parquet") if (root / sub).is_dir() else []:
            if not any(part.startswith(".") for part in path.relative_to(root).parts):
                pq.read_metadata(path)  # a visible file is always a whole file
    return len(markers)


# -- a job's own local Ray, and its clean-up ------------------------------------------------


def _processes_of(marker: str) -> list[int]:
    """Pids whose command line or environment mentions ``marker`` (a unique temp dir)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    if needle in f.read():
                        found.append(int(entry))
                        break
            except OSError:
                continue
    return found


def kill_ray_instance(pgid: int | None, temp_dir: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL a dead driver's process group and any process of its Ray instance.

    A Ray instance is identified by its unique ``RAY_TMPDIR`` (in each process's
    environment, and in the raylet's and workers' command lines), so other
    engineers' Ray processes on this machine are never touched. Returns the pids
    that were still alive and got killed.
    """
    killed: list[int] = []
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in _processes_of(temp_dir) if _is_alive(p)]
        if not alive:
            return killed
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"Ray processes of {temp_dir} survive SIGKILL: {alive}")
        time.sleep(0.2)


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # zombies are dead already
    except (OSError, IndexError):
        return False


def images_for(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of ``n`` deterministic scenes of a few sizes."""
    sizes = ((72, 96), (96, 72), (80, 80), (64, 112))
    return [(f"img-{i:03d}.png", scene_png(i, sizes[i % 4])) for i in range(start, start + n)]
