"""Load: a 5,000-image job on a 2-core machine, and the driver's memory at 1,000 vs 5,000.

    python benchmarks/load.py [--sizes 1000 5000 --out benchmarks/results/load-cpu.json]

The promise checked: the driver streams (it keeps one small summary row per shard,
never detections or pixels), so its peak memory does not grow with the number of
inputs. Each job runs as its own process (the driver), exactly like
``sam3ray run``, on its own local Ray (a private ``RAY_TMPDIR``, cleaned up after):

- the driver's peak RSS is read twice: by the driver itself (``VmHWM`` of
  /proc/self/status: the high-water mark of this process's memory since its exec;
  Ray's raylet and workers are other processes; ``ru_maxrss`` would also count the
  forking parent's pages) and by this script sampling it with psutil every 0.1 s;
- pass: peak RSS at the largest size within 20% of that at the smallest.

The job: ``--sizes`` generated 64x64 PNG scenes (written once, a manifest per size),
the tiny random-weight SAM 3 at 168 px, one concept, ``conf`` 0.9 so the outputs stay
small, one actor (1 CPU) plus decode/write tasks on the other core. Every input must
appear exactly once in the images table (checked after each job). Start-up (Ray,
actor + model load) is reported apart from throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procmem import peak_rss_mb  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from a source checkout
    sys.path.insert(0, str(ROOT))

THING = "3f0b6a52-7c1e-4d2a-9b8f-1e2d3c4b5a60"
RESOLUTION = 168
TOLERANCE = 0.20


def write_images(root: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(n):
        path = root / f"d{i // 500:03d}" / f"img-{i:05d}.png"
        paths.append(str(path))
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        img = np.zeros((64, 64, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        y, x = rng.integers(0, 40, 2)
        img[y : y + 24, x : x + 24] = rng.integers(0, 256, 3, dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return paths


def job_config(work: Path, n: int, paths: list[str], checkpoint: str) -> dict[str, Any]:
    manifest = work / f"manifest-{n}.txt"
    manifest.write_text("".join(p + "\n" for p in paths[:n]), encoding="utf-8")
    concepts = work / "concepts.csv"
    concepts.write_text(f"class_id,name,text\n{THING},thing,object\n", encoding="utf-8")
    return {
        "input": {"manifest": str(manifest)},
        "prompts": {"concepts": str(concepts)},
        "model": {"checkpoint": checkpoint, "device": "cpu", "dtype": "float32"},
        "inference": {
            "conf": 0.9,
            "max_det": 8,
            "max_imgsz": 64,
            "images_per_batch": 16,
            "queries_per_forward": 16,
        },
        "resources": {
            "gpus_per_actor": 0,
            "cpus_per_actor": 1,
            "actors": [1, 1],
            "decode_cpus": 0.25,
            "object_store_memory": 300 * 1024 * 1024,
        },
        "output": {"uri": str(work / f"out-{n}"), "mode": "overwrite", "shard_size": 256},
    }


# -- the driver process ------------------------------------------------------------------


def child(config_path: str, report_path: str) -> int:
    """Run one job as the driver and report its summary and own peak RSS."""
    import yaml

    from sam3ray.config import JobConfig
    from sam3ray.runner.job import run_job

    t0 = time.perf_counter()
    cfg = JobConfig.model_validate(yaml.safe_load(Path(config_path).read_text()))
    hwm_before = peak_rss_mb()
    summary = run_job(cfg)
    report = {
        "summary": summary,
        "wall_s": round(time.perf_counter() - t0, 2),
        "vm_hwm_mb_before_job": hwm_before,
        "vm_hwm_mb": peak_rss_mb(),
    }
    Path(report_path).write_text(json.dumps(report, default=str), encoding="utf-8")
    return 0


def _kill_ray_instance(temp_dir: str) -> list[int]:
    """SIGKILL leftover processes of one Ray instance (found by its private RAY_TMPDIR)."""
    needle, killed = temp_dir.encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if needle in env or needle in cmd:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


def run_one(work: Path, n: int, paths: list[str], checkpoint: str) -> dict[str, Any]:
    import psutil
    import pyarrow.dataset as ds
    import yaml

    config = work / f"job-{n}.yaml"
    config.write_text(yaml.safe_dump(job_config(work, n, paths, checkpoint)), encoding="utf-8")
    report_path = work / f"report-{n}.json"
    ray_tmp = tempfile.mkdtemp(prefix="s3r-load-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmp
    log = work / f"driver-{n}.log"
    cmd = [sys.executable, __file__, "--child", str(config), str(report_path)]
    peak_sampled, samples = 0, 0
    t0 = time.perf_counter()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak_sampled = max(peak_sampled, driver.memory_info().rss)
                samples += 1
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    leftovers = _kill_ray_instance(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"job of {n} failed ({proc.returncode}); see {log}")
    report = json.loads(report_path.read_text())
    s = report["summary"]
    images = ds.dataset(str(work / f"out-{n}" / "images"), format="parquet").to_table(
        columns=["uri", "status"]
    )
    uris = images.column("uri").to_pylist()
    assert len(uris) == n and len(set(uris)) == n and set(uris) == set(paths[:n]), "exactly once"
    return {
        "inputs": n,
        "ok": s["ok"],
        "errors": s["errors"],
        "detections": s["detections"],
        "shards": s["shards"]["done_now"],
        "images_table_rows": len(uris),
        "wall_s_process": round(wall, 2),
        "timing_s": s["timing_s"],
        "images_per_s": s["throughput"]["images_per_s"],
        "images_per_s_after_first_shard": s["throughput"]["images_per_s_after_first_shard"],
        "driver_peak_rss_mb": report["vm_hwm_mb"],
        "driver_peak_rss_mb_sampled": round(peak_sampled / 2**20, 1),
        "driver_peak_rss_mb_before_job": report["vm_hwm_mb_before_job"],
        "rss_samples": samples,
        "ray_processes_left_and_killed": len(leftovers),
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load-cpu.json"))
    p.add_argument("--work", default=None, help="work directory (default: a temp dir)")
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "REPORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)

    from sam3ray.model.tiny import make_tiny_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="sam3ray-load-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = write_images(work / "images", max(args.sizes))
    checkpoint = str(make_tiny_checkpoint(work / "sam3-tiny-168.pt", resolution=RESOLUTION))
    prep_s = time.perf_counter() - t0
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for n in sorted(args.sizes):
        print(f"job of {n} images ...", flush=True)
        runs.append(run_one(work, n, paths, checkpoint))
        r = runs[-1]
        print(
            f"  {r['ok']}/{n} ok, {r['images_per_s']} img/s "
            f"({r['images_per_s_after_first_shard']} after the first shard), "
            f"driver peak RSS {r['driver_peak_rss_mb']} MB "
            f"(sampled {r['driver_peak_rss_mb_sampled']} MB), {r['wall_s_process']} s",
            flush=True,
        )
    small, large = runs[0], runs[-1]
    ratio = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
    ratio_sampled = large["driver_peak_rss_mb_sampled"] / small["driver_peak_rss_mb_sampled"]
    from sam3ray.runner.summary import versions

    result = {
        "benchmark": "load",
        "what": "driver peak RSS vs number of inputs; a 5,000-image job on CPU",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_before": load_before,
            "note": "shared machine: other jobs may run; timings are indicative",
        },
        "params": {
            "image_size": [64, 64],
            "model": f"tiny random-weight SAM 3 at {RESOLUTION} px",
            "concepts": 1,
            "conf": 0.9,
            "shard_size": 256,
            "actors": 1,
        },
        "prep_s": round(prep_s, 2),
        "runs": runs,
        "driver_peak_rss_ratio": round(ratio, 3),
        "driver_peak_rss_ratio_sampled": round(ratio_sampled, 3),
        "tolerance": TOLERANCE,
        "pass": bool(abs(ratio - 1) <= TOLERANCE and large["ok"] == large["inputs"]),
        "versions": versions(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"driver peak RSS {small['inputs']}: {small['driver_peak_rss_mb']} MB, "
        f"{large['inputs']}: {large['driver_peak_rss_mb']} MB (x{ratio:.3f}; "
        f"sampled x{ratio_sampled:.3f}) -> {'PASS' if result['pass'] else 'FAIL'}; {out}"
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
