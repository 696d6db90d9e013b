"""Activation memory of SAM 3 per image and per query, and the batch sizes it plans per actor.

    python benchmarks/memory.py [--full-size] [--dtypes float32,bfloat16]
                                [--out benchmarks/results/memory-cpu.json]

What is measured: ``sam3ray.model.memory.measure_activations`` (the same code an actor
runs at start on a GPU) on the tiny model, or with ``--full-size`` on the released
architecture with random weights at 1008 px, in each ``--dtypes`` (bfloat16 = bf16
weights under bf16 autocast, as ``model.dtype: bfloat16`` runs). Off a GPU the meter
is :class:`~sam3ray.model.memory.LiveBytes` (tensor storages alive at once): no
caching-allocator slack and CPU attention kernels, so treat the numbers as the
activations themselves; on a GPU the engine re-measures with the allocator's peak.

Then, per dtype, :func:`~sam3ray.model.memory.plan_batches` for common GPU shares
(10 text concepts per image): what one actor holds (weights + CUDA context +
planned activations) and the batch sizes ``auto`` picks. Full size on CPU takes
several minutes (three backbone passes of ~45 s each, plus four prompts).
"""

from __future__ import annotations

import argparse
import json
import logging
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

logger = logging.getLogger("benchmarks.memory")

#: (name, device GiB, gpus_per_actor) of the shares the README sizes.
SHARES = [
    ("T4 16 GB", 16, 0.5),
    ("A10G / L4 24 GB", 24, 0.25),
    ("A10G / L4 24 GB", 24, 0.5),
    ("A100 40 GB", 40, 0.25),
    ("A100 / H100 80 GB", 80, 0.25),
    ("H100 80 GB", 80, 1.0),
]
CONCEPTS_PER_IMAGE = 10
GiB, MiB = 2**30, 2**20


def build(full_size: bool, dtype: str, tmp: str):
    """(engine, description) on the CPU, weights in ``dtype``."""
    import torch

    from sam3ray import Concept, ConceptSet
    from sam3ray.model import compat
    from sam3ray.model.engine import Sam3Engine

    compat.ensure()
    concepts = ConceptSet((Concept("00000000-0000-4000-8000-000000000001", "cat", ("cat",)),))
    if full_size:
        from sam3ray.model.arch import Sam3Arch, build_image_model
        from sam3ray.model.tiny import init_uninitialised

        arch = Sam3Arch.full()
        model = build_image_model(arch).eval()
        init_uninitialised(model, torch.Generator().manual_seed(0))
        engine = Sam3Engine(model, concepts, device="cpu", dtype=dtype, resolution=arch.resolution)
        return engine, "full-size architecture (random weights), 1008 px"
    from sam3ray.model.tiny import make_tiny_checkpoint

    ckpt = str(make_tiny_checkpoint(Path(tmp) / "sam3-tiny.pt", seed=0))
    engine = Sam3Engine.from_checkpoint(ckpt, concepts, device="cpu", dtype=dtype)
    return engine, f"tiny model, {engine.resolution} px"


def weight_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def plans(sizes: Any, weights: int) -> list[dict[str, Any]]:
    from sam3ray.model.batches import post_processing_bytes
    from sam3ray.model.memory import CUDA_CONTEXT_BYTES, SAFETY, plan_batches

    mask_bytes = post_processing_bytes(None)  # the default: max_imgsz null
    out = []
    for name, gib, share in SHARES:
        budget = max(0, int((gib * GiB * share - weights - CUDA_CONTEXT_BYTES) * SAFETY))
        plan = plan_batches(sizes, budget, CONCEPTS_PER_IMAGE, mask_bytes=mask_bytes)
        activations = (
            plan.images_per_batch * sizes.per_image
            + sizes.fixed
            + plan.queries_per_forward * sizes.per_query
            + mask_bytes
        )
        out.append(
            {
                "gpu": name,
                "gpus_per_actor": share,
                "share_gib": round(gib * share, 2),
                "activation_budget_mib": budget // MiB,
                "images_per_batch": plan.images_per_batch,
                "queries_per_forward": plan.queries_per_forward,
                "actor_total_gib": round((weights + CUDA_CONTEXT_BYTES + activations) / GiB, 2),
                "fits": activations <= budget,
            }
        )
    return out


def replan(path: Path) -> None:
    """Plans of ``path``'s runs recomputed from their measured sizes, written back."""
    from sam3ray.model.memory import ActivationSizes

    result = json.loads(path.read_text())
    for run in result["runs"]:
        sizes = ActivationSizes(**run["sizes_bytes"])
        run["plans"] = plans(sizes, int(run["weights_mib"] * MiB))
    result["plans_recomputed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps(result, indent=2) + "\n")
    for run in result["runs"]:
        for plan in run["plans"]:
            print(run["dtype"], plan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full-size", action="store_true", help="the released architecture")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machines: 1)")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--replan",
        metavar="JSON",
        help="recompute the plans of a results file from the sizes it measured (the planner "
        "changed, the model did not: the full-size measurement takes ~20 min per dtype)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.replan:
        replan(Path(args.replan))
        return
    import torch

    from sam3ray.model.memory import LiveBytes, measure_activations

    torch.set_num_threads(args.threads)
    out = Path(
        args.out
        or ROOT / "benchmarks" / "results" / f"memory-cpu{'-full' if args.full_size else ''}.json"
    )
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_1_5_15_start": list(os.getloadavg()),
        },
        "meter": "LiveBytes (tensor storages alive at once, CPU)",
        "concepts_per_image_for_plans": CONCEPTS_PER_IMAGE,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            engine, what = build(args.full_size, dtype, tmp)
            build_s = time.perf_counter() - t0
            weights = weight_bytes(engine.model)
            t0 = time.perf_counter()
            sizes = measure_activations(engine, LiveBytes())
            run = {
                "model": what,
                "dtype": dtype,
                "weights_mib": round(weights / MiB, 1),
                "per_image_mib": round(sizes.per_image / MiB, 1),
                "per_query_mib": round(sizes.per_query / MiB, 2),
                "pack_fixed_mib": round(sizes.fixed / MiB, 1),
                "sizes_bytes": sizes.to_dict(),
                "build_s": round(build_s, 1),
                "measure_s": round(time.perf_counter() - t0, 1),
                "plans": plans(sizes, weights),
            }
            logger.info("%s", json.dumps({k: v for k, v in run.items() if k != "plans"}))
            result["runs"].append(run)
            del engine
    result["machine"]["loadavg_1_5_15_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for run in result["runs"]:
        print(
            f"{run['model']} {run['dtype']}: weights {run['weights_mib']} MiB, per image "
            f"{run['per_image_mib']} MiB, per query {run['per_query_mib']} MiB, pack fixed "
            f"{run['pack_fixed_mib']} MiB"
        )
        for plan in run["plans"]:
            print(
                f"  {plan['gpu']:<18} × {plan['gpus_per_actor']:<4} -> images "
                f"{plan['images_per_batch']:>2}, queries {plan['queries_per_forward']:>3}, "
                f"actor {plan['actor_total_gib']} GiB{'' if plan['fits'] else ' (does not fit)'}"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
