"""The one job config of the tests, the concept tables they use, output readers, Ray clean-up.

Two presets: the integration jobs (3 classes, one with two synonyms and one
with its own threshold; 4 text queries per image) and the fault jobs (one
concept with one text: cheap on two cores, and a disturbed run is compared
with an undisturbed one, so every setting their output depends on is fixed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sam3ray.config import JobConfig
from tests.support.images import scene_bytes

CAT = "6f1c2a4e-1b7d-4c1e-9a55-0d7f1c3e2b01"
PERSON = "0b8e3d52-9f4a-4f7b-8c21-5e6d7a8b9c02"
ROCKET = "a3d9c1f0-2e4b-4a6c-b7d8-9e0f1a2b3c03"
CLASS_IDS = (CAT, PERSON, ROCKET)
#: 3 classes, one with two synonyms, one with its own threshold (4 text queries per image).
CONCEPTS_CSV = (
    "class_id,name,text,min_score\n"
    f"{CAT},cat,cat,\n"
    f"{CAT},cat,kitten,\n"
    f"{PERSON},person,person,\n"
    f"{ROCKET},rocket,rocket,0.5\n"
)
#: ``inference:`` of the integration jobs (masks in original pixels: max_imgsz unset).
INFERENCE: dict[str, Any] = {
    "conf": 0.4,
    "iou": 0.7,
    "nms": True,
    "max_det": 50,
    "images_per_batch": 4,
    "queries_per_forward": 32,
}

THING = "3f0b6a52-7c1e-4d2a-9b8f-1e2d3c4b5a60"
#: One concept, one text: the fault jobs.
THING_CSV = f"class_id,name,text\n{THING},thing,object\n"
FAULT_INFERENCE: dict[str, Any] = {
    "conf": 0.3,
    "iou": 0.7,
    "nms": True,
    "max_det": 8,
    "images_per_batch": 2,
    "queries_per_forward": 8,
}
#: The fault jobs' own local Ray is small: one actor of one CPU plus a quarter for decoding.
FAULT_RESOURCES: dict[str, Any] = {
    "cpus_per_actor": 1,
    "decode_cpus": 0.25,
    "object_store_memory": 200 * 1024 * 1024,
}


def write_concepts(path: Path, text: str = CONCEPTS_CSV) -> str:
    """Write a concept table (a ``.csv`` path, or a folder to hold ``concepts.csv``)."""
    path = Path(path)
    if not path.suffix:
        path = path / "concepts.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def job_dict(
    *,
    concepts: str,
    checkpoint: str,
    output: str,
    uris: list[str] | None = None,
    manifest: str | None = None,
    storage_options: dict[str, Any] | None = None,
    geometric: str | None = None,
    shard_size: int = 3,
    run_id: str | None = None,
    cache_dir: str | None = None,
    inference: dict[str, Any] | None = None,
    actors: tuple[int, int] = (1, 2),
    resources: dict[str, Any] | None = None,
    **output_extra: Any,
) -> dict[str, Any]:
    """A small CPU job as plain data (YAML-able for the CLI): tiny model, float32,
    1-2 single-thread actors (each 0.5 + 0.25 CPU for decoding: two fit next to a
    commit task on two cores), small shards."""
    return {
        "run_id": run_id,
        "input": {
            "uris": list(uris or []),
            "manifest": manifest,
            "storage_options": storage_options or {},
        },
        "prompts": {"concepts": concepts, "geometric": geometric},
        "model": {
            "checkpoint": checkpoint,
            "device": "cpu",
            "dtype": "float32",
            "cache_dir": cache_dir,
        },
        "inference": dict(inference or INFERENCE),
        "resources": {
            "gpus_per_actor": 0,
            "cpus_per_actor": 0.5,
            "actors": list(actors),
            "decode_cpus": 0.25,
            **(resources or {}),
        },
        "output": {"uri": output, "shard_size": shard_size, **output_extra},
    }


def job_config(**kw: Any) -> JobConfig:
    return JobConfig.model_validate(job_dict(**kw))


def fault_job_config(**kw: Any) -> JobConfig:
    """The fault tests' job: one concept, shards of one image, one actor."""
    return JobConfig.model_validate(fault_job_dict(**kw))


def fault_job_dict(**kw: Any) -> dict[str, Any]:
    kw.setdefault("shard_size", 1)
    kw.setdefault("actors", (1, 1))
    kw.setdefault("inference", FAULT_INFERENCE)
    kw.setdefault("resources", FAULT_RESOURCES)
    return job_dict(**kw)


def config_yaml(cfg: JobConfig) -> str:
    """The YAML a user would write for ``cfg`` (for CLI tests)."""
    import yaml

    data = cfg.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)


def images_for(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of ``n`` deterministic scenes of a few sizes."""
    sizes = ((72, 96), (96, 72), (80, 80), (64, 112))
    return [(f"img-{i:03d}.png", scene_bytes(i, sizes[i % 4])) for i in range(start, start + n)]


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
