"""The whole Ray job (``run_job``) vs ``Sam3Engine`` alone on the same images: pipeline efficiency.

    python benchmarks/pipeline.py [--images 300 --concepts 3 --actors 1 2 --size 256
                                   --out benchmarks/results/pipeline-cpu.json]

What is measured, on ``--images`` generated ``--size``² JPEG scenes written once
to a work directory, with the tiny random-weight SAM 3 and ``--concepts`` text
concepts (CPU):

(a) engine alone: in this process, the images are read and decoded exactly as
    the image actors' reader does (original size; timed separately), then
    ``Sam3Engine.predict`` runs over them in batches of ``--images-per-batch``
    after one warm-up batch.
    With the torch threads one actor gets: before and after the jobs (the mean
    is the baseline, the spread shows load drift); with all cores: after.
(b) the job: ``run_job`` on a fresh local Ray for each ``--actors`` value
    (a fixed pool of n actors), output to a local directory (overwrite mode).
    Start-up is reported apart from throughput: ``timing_s.ray_init`` (Ray
    start), ``timing_s.first_shard`` (actor start-up + model load + the first
    shard), and ``throughput.images_per_s_after_first_shard`` (the steady state,
    driver clock). ``actor_side`` gives the same rate from the shards' own
    ``created_at`` stamps (see :func:`actor_side_rate` for why both).

Pipeline efficiency = job images/s after the first shard ÷ engine-alone images/s,
so start-up is excluded. Every job's detection count is checked against the
engine's. Two baselines, because on a small machine they differ:

- ``per_actor``: n × (engine alone with the threads ONE actor gets). Ray sets
  an actor's OMP/torch threads to floor(num_cpus), at least 1; the actors here
  reserve < 2 CPUs each (``cpus_per_actor`` + ``decode_cpus`` for the reader
  threads; write tasks need the rest of a 2-core machine), so each actor runs
  torch on 1 thread and reads/decodes its images in other threads. This is the
  fair "what the pool could do if the pipeline cost nothing" bound.
- ``machine``: engine alone with all cores as torch threads: what one process
  could do with the whole machine. The job cannot reach this with 1 actor on
  2 cores (its actor has 1 thread), which is why per_actor is the headline.

The machine may be shared: the load average is recorded around every
measurement. Results (machine, parameters, measurements, efficiencies) go to
``--out`` as JSON and a table is printed.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from a source checkout
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.pipeline")

CONCEPT_TEXTS = ["person", "car", "dog", "cat", "tree", "bicycle", "bird", "boat"]


# --------------------------------------------------------------------------- inputs


def prepare_workdir(workdir: Path, n_images: int, size: int, n_concepts: int) -> dict[str, Any]:
    """Images (written once, reused if present), the concept table, the tiny checkpoint."""
    from PIL import Image

    from sam3ray.demo.images import synthetic_scene
    from sam3ray.model.tiny import make_tiny_checkpoint

    images = workdir / f"images-{size}"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        path = images / f"scene-{i:05d}.jpg"
        if not path.exists():
            buf = io.BytesIO()
            Image.fromarray(synthetic_scene(i, (size, size))).save(buf, "JPEG", quality=90)
            path.write_bytes(buf.getvalue())
    uris = sorted(str(p) for p in images.glob("scene-*.jpg"))[:n_images]
    if len(uris) < n_images:
        raise SystemExit(f"{images} holds {len(uris)} images, {n_images} asked")
    if n_concepts > len(CONCEPT_TEXTS):
        raise SystemExit(f"--concepts at most {len(CONCEPT_TEXTS)}")
    concepts = workdir / f"concepts-{n_concepts}.csv"
    rows = ["class_id,name,text"]
    for i, text in enumerate(CONCEPT_TEXTS[:n_concepts]):
        rows.append(f"00000000-0000-4000-8000-{i + 1:012d},{text},{text}")
    concepts.write_text("\n".join(rows) + "\n")
    checkpoint = workdir / "sam3-tiny.pt"
    if not checkpoint.exists():
        make_tiny_checkpoint(checkpoint, seed=0)
    # A manifest selects exactly these images (the folder may hold more from a larger run).
    manifest = workdir / f"manifest-{size}-{n_images}.txt"
    manifest.write_text("\n".join(uris) + "\n")
    return {"uris": uris, "concepts": str(concepts), "checkpoint": str(checkpoint),
            "manifest": str(manifest)}  # fmt: skip


# --------------------------------------------------------------------------- engine alone


def decode_all(uris: list[str]) -> tuple[list, float]:
    """(original arrays, seconds): what the actors' reader does, in one thread."""
    from sam3ray.sources.images import decode_image
    from sam3ray.storage.location import Location

    t0 = time.perf_counter()
    arrays = [decode_image(Location(u).read_bytes(), max_pixels=178_956_970) for u in uris]
    return arrays, time.perf_counter() - t0


def engine_alone(
    files: dict[str, Any], args: argparse.Namespace, threads: int, decoded
) -> dict[str, Any]:
    import torch

    from sam3ray import InferenceConfig, Sam3Engine
    from sam3ray.sources.prompts import load_concepts
    from sam3ray.storage.location import Location

    torch.set_num_threads(threads)
    arrays, _ = decoded
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    engine = Sam3Engine.from_checkpoint(
        files["checkpoint"],
        load_concepts(Location(files["concepts"])),
        InferenceConfig(**engine_params(args)),
        device="cpu",
        dtype="float32",
    )
    load_s = time.perf_counter() - t0
    step = args.images_per_batch
    engine.predict(arrays[:step])  # warm-up, not counted
    n_det = 0
    t0 = time.perf_counter()
    for start in range(0, len(arrays), step):
        found = engine.predict(arrays[start : start + step])
        n_det += sum(map(len, found))
    seconds = time.perf_counter() - t0
    return {
        "torch_threads": threads,
        "images": len(arrays),
        "model_load_s": round(load_s, 3),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(arrays) / seconds, 3),
        "detections": n_det,
        "loadavg_1m_before_after": [load0, os.getloadavg()[0]],
    }


def engine_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several engine-alone runs at one thread count: the mean rate, and every run."""
    rates = [r["images_per_s"] for r in runs]
    return {
        "torch_threads": runs[0]["torch_threads"],
        "images": runs[0]["images"],
        "images_per_s": round(sum(rates) / len(rates), 3),
        "images_per_s_runs": rates,
        "detections": runs[0]["detections"],
        "runs": runs,
    }


def engine_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "conf": args.conf,
        "iou": 0.7,
        "max_det": args.max_det,
        "max_imgsz": args.max_imgsz,
        "queries_per_forward": args.queries_per_forward,
        "images_per_batch": args.images_per_batch,
    }


# --------------------------------------------------------------------------- the job


def cpus_per_actor(n_actors: int, cores: int, decode_cpus: float) -> float:
    """The largest per-actor model share (each actor also reserves ``decode_cpus`` for
    its reader) that leaves room for the job's small tasks (a commit, a plan reader)."""
    from sam3ray.runner.planning import PLAN_READ_CPUS
    from sam3ray.stages.commit import COMMIT_CPUS

    share = (cores - COMMIT_CPUS - PLAN_READ_CPUS) / n_actors - decode_cpus
    return round(min(1.0, share), 3)


def run_pipeline(files: dict[str, Any], args: argparse.Namespace, n_actors: int, workdir: Path):
    import ray

    from sam3ray.config import JobConfig
    from sam3ray.runner.job import run_job

    if ray.is_initialized():
        ray.shutdown()  # every job measures its own Ray start
    cores = os.cpu_count() or 1
    cpa = cpus_per_actor(n_actors, cores, args.decode_cpus)
    if cpa <= 0:
        raise SystemExit(f"{n_actors} actors do not fit on {cores} cores next to decode/write")
    cfg = JobConfig.model_validate(
        {
            "run_id": f"bench-{n_actors}a-{time.strftime('%H%M%S')}",
            "input": {"manifest": files["manifest"]},
            "prompts": {"concepts": files["concepts"]},
            "model": {"checkpoint": files["checkpoint"], "device": "cpu", "dtype": "float32"},
            "inference": engine_params(args),
            "resources": {
                "gpus_per_actor": 0,
                "cpus_per_actor": cpa,
                "actors": [n_actors, n_actors],
                "decode_cpus": args.decode_cpus,
                # "local": always a fresh Ray on this machine, never someone's `ray start`.
                "ray_address": "local",
            },
            "output": {
                "uri": str(workdir / f"out-{n_actors}-actors"),
                "mode": "overwrite",
                "shard_size": args.shard_size,
            },
        }
    )
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = run_job(cfg)
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {
        "actor_side": actor_side_rate(cfg.output.uri),
        "actors": n_actors,
        "cpus_per_actor": cpa,
        # Ray's OMP_NUM_THREADS rule, on the actor's whole reservation
        "torch_threads_per_actor": max(1, math.floor(cpa + args.decode_cpus)),
        "decode_cpus": args.decode_cpus,
        "run_id": summary["run_id"],
        "wall_s": round(wall, 3),
        "timing_s": summary["timing_s"],
        "throughput": summary["throughput"],
        "images": summary["inputs_processed"],
        "ok": summary["ok"],
        "detections": summary["detections"],
        "shards": summary["shards"]["done_now"],
        "actor_count": summary["actors"]["count"],
        "model_loads_per_actor": summary["actors"]["model_loads_per_actor"],
        "loadavg_1m_before_after": [load0, os.getloadavg()[0]],
    }


def actor_side_rate(output_uri: str) -> dict[str, Any]:
    """Steady-state rate from the images table: when each shard left its actor.

    ``created_at`` is stamped once per shard by the actor right after inference.
    (images after the first shard) / (last - first shard's stamp) excludes Ray
    start, actor start and the first shard, like the summary's
    ``images_per_s_after_first_shard``, but does not depend on when results reach
    the driver: that one starts its clock at the first *written* shard, by which
    time the actor may have finished more shards (counted but not timed), so it
    reads high when writing lags (e.g. a write worker still starting up).
    """
    import pyarrow.dataset as ds

    table = ds.dataset(f"{output_uri}/images", format="parquet").to_table(
        columns=["shard_id", "created_at"]
    )
    per_shard: dict[str, list] = {}
    for row in table.to_pylist():
        per_shard.setdefault(row["shard_id"], []).append(row["created_at"])
    done = sorted((min(ts), len(ts)) for ts in per_shard.values())
    if len(done) < 2:
        return {"images_per_s_after_first_shard": None}
    window = (done[-1][0] - done[0][0]).total_seconds()
    images = sum(n for _, n in done[1:])
    return {
        "images_per_s_after_first_shard": round(images / window, 3) if window > 0 else None,
        "window_s": round(window, 3),
        "images": images,
    }


# --------------------------------------------------------------------------- report


def efficiencies(jobs: list[dict], engines: dict[int, dict]) -> None:
    cores = os.cpu_count() or 1
    for job in jobs:
        steady = job["throughput"]["images_per_s_after_first_shard"]
        actor_side = job["actor_side"]["images_per_s_after_first_shard"]
        per_actor = engines.get(job["torch_threads_per_actor"])
        machine = engines.get(cores)
        eff: dict[str, Any] = {}
        if per_actor:
            ideal = job["actors"] * per_actor["images_per_s"]
            eff["per_actor_baseline_images_per_s"] = round(ideal, 3)
            if steady:
                eff["per_actor"] = round(steady / ideal, 3)
            if actor_side:
                eff["per_actor_actor_side"] = round(actor_side / ideal, 3)
        if machine:
            eff["machine_baseline_images_per_s"] = machine["images_per_s"]
            if steady:
                eff["machine"] = round(steady / machine["images_per_s"], 3)
            if actor_side:
                eff["machine_actor_side"] = round(actor_side / machine["images_per_s"], 3)
        job["efficiency"] = eff


def annotate(result: dict[str, Any]) -> None:
    """Add ``warnings``: a shared, overloaded machine, or a job whose detections differ."""
    cores = result["machine"]["cpu_count"] or 1
    loads = [*result["machine"]["loadavg_1_5_15_start"][:1]]
    for item in [*(r for e in result["engine_alone"] for r in e["runs"]), *result["jobs"]]:
        loads += item["loadavg_1m_before_after"]
    warnings = []
    if max(loads) > cores:
        warnings.append(
            f"1-min load average reached {max(loads):.1f} on {cores} cores: other processes "
            "shared the CPUs, so wall-clock rates (and the efficiencies) are noisy; compare "
            "only runs taken under similar load"
        )
    want = {r["detections"] for e in result["engine_alone"] for r in e["runs"]}
    for job in result["jobs"]:
        job["detections_match_engine"] = {job["detections"]} == want
        if not job["detections_match_engine"]:
            warnings.append(f"job with {job['actors']} actor(s): detections differ from engine")
    result["warnings"] = warnings


def table(result: dict[str, Any]) -> str:
    nan = float("nan")
    lines = [
        f"{'run':<20}{'threads':>8}{'images':>7}{'img/s':>7}{'(actor)':>8}{'ray init':>9}"
        f"{'1st shard':>10}{'eff/actor':>10}{'(actor)':>8}{'eff/machine':>12}",
    ]
    for e in result["engine_alone"]:
        runs = "  (runs: " + ", ".join(f"{r:.2f}" for r in e["images_per_s_runs"]) + ")"
        lines.append(
            f"{'engine alone':<20}{e['torch_threads']:>8}{e['images']:>7}"
            f"{e['images_per_s']:>7.2f}{'':>8}{'-':>9}{'-':>10}{'-':>10}{'':>8}{'-':>12}"
            + (runs if len(e["images_per_s_runs"]) > 1 else "")
        )
    for j in result["jobs"]:
        eff = j.get("efficiency", {})
        lines.append(
            f"{'job, ' + str(j['actors']) + ' actor(s)':<20}"
            f"{str(j['torch_threads_per_actor']) + '/act':>8}{j['images']:>7}"
            f"{j['throughput']['images_per_s_after_first_shard'] or nan:>7.2f}"
            f"{j['actor_side']['images_per_s_after_first_shard'] or nan:>8.2f}"
            f"{j['timing_s']['ray_init']:>9.2f}{j['timing_s']['first_shard']:>10.2f}"
            f"{eff.get('per_actor', nan):>10.2f}{eff.get('per_actor_actor_side', nan):>8.2f}"
            f"{eff.get('machine', nan):>12.2f}"
        )
    lines.append(
        "job img/s: steady state after the first shard, from the run summary (driver clock) "
        "and (actor) from the shards' created_at stamps; eff = job img/s / engine img/s"
    )
    lines.append(
        "incl. start-up: "
        + ", ".join(
            f"{j['actors']} actor(s) {j['throughput']['images_per_s']} img/s in {j['wall_s']} s"
            for j in result["jobs"]
        )
    )
    lines.append(f"decode alone (1 thread): {result['decode']['images_per_s']} img/s")
    lines += [f"WARNING: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import ray
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        # The machine may be shared: a high load average makes CPU timings noisy.
        "loadavg_1_5_15_start": list(os.getloadavg()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--concepts", type=int, default=3, help="text concepts (one text each)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="pool sizes to run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline-cpu.json"))
    p.add_argument("--size", type=int, default=256, help="square image side in pixels")
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--images-per-batch", type=int, default=8)
    p.add_argument("--queries-per-forward", type=int, default=64)
    p.add_argument("--max-imgsz", type=int, default=None, help="mask grid cap (None: original)")
    p.add_argument("--max-det", type=int, default=100)
    p.add_argument("--conf", type=float, default=0.4)
    p.add_argument("--decode-cpus", type=float, default=0.5, help="per actor, for its reader")
    p.add_argument("--workdir", default=None, help="images/model are kept here (default: temp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TORCHVISION_WARN_WHEN_EXTENSION_LOADING_FAILS", "")
    with tempfile.TemporaryDirectory(prefix="sam3ray-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        files = prepare_workdir(workdir, args.images, args.size, args.concepts)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        result: dict[str, Any] = {
            "benchmark": "pipeline",
            "machine": machine_info(),
            "params": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        }
        decoded = decode_all(files["uris"])
        result["decode"] = {
            "images": len(files["uris"]),
            "seconds": round(decoded[1], 3),
            "images_per_s": round(len(files["uris"]) / decoded[1], 3),
        }
        cores = os.cpu_count() or 1
        per_actor_threads = sorted(
            {max(1, math.floor(cpus_per_actor(n, cores, args.decode_cpus) + args.decode_cpus))
             for n in args.actors}
        )  # fmt: skip
        # The per-actor baseline is measured before AND after the jobs (its mean is
        # used; the spread shows how much the machine's load moved meanwhile).
        runs: dict[int, list[dict[str, Any]]] = {}
        for threads in per_actor_threads:
            print(f"engine alone, {threads} torch thread(s) ...", flush=True)
            runs.setdefault(threads, []).append(engine_alone(files, args, threads, decoded))
        jobs = []
        for n in args.actors:
            print(f"job, {n} actor(s) ...", flush=True)
            jobs.append(run_pipeline(files, args, n, workdir))
        for threads in sorted({*per_actor_threads, cores}):
            print(f"engine alone, {threads} torch thread(s) ...", flush=True)
            runs.setdefault(threads, []).append(engine_alone(files, args, threads, decoded))
        del decoded
        engines = {t: engine_summary(rs) for t, rs in runs.items()}
        result["engine_alone"] = [engines[t] for t in sorted(engines)]
        efficiencies(jobs, engines)
        result["jobs"] = jobs
        result["machine"]["loadavg_1_5_15_end"] = list(os.getloadavg())
        annotate(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
