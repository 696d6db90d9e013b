"""Sam3Engine vs the official one-prompt-at-a-time loop (``Sam3Processor``), side by side.

    python benchmarks/engine.py [--images 16 --concepts 10 --checkpoint PATH
                                 --out benchmarks/results/engine-cpu.json --device auto]
    python benchmarks/engine.py --full-size [--peak-tflops 989]     # GPU only

Default: the tiny random-weight SAM 3 (built into a temporary directory unless
``--checkpoint`` is given), ``--images`` deterministic synthetic scenes of mixed
sizes (long side <= 480 px) and ``--concepts`` text prompts.

(a) engine: ``Sam3Engine.predict`` over batches of ``--batch`` images
    (backbone once per image, text features cached for the engine's life, all
    (image, concept) pairs through the detector in packs of ``--queries-per-forward``,
    then threshold/NMS/max_det and COCO RLE encoding of the kept masks);
(b) reference: per image ``set_image`` once, then per concept ``set_text_prompt``
    (text encoder + detector per prompt, masks upsampled to the image; no NMS, no RLE);
(c) reference + RLE: (b) plus each kept mask copied to the host and encoded by
    pycocotools, what storing the official loop's labels takes (the engine's output
    is COCO RLE).

Each side gets one warm-up pass, then (a) and (b) alternate for ``--repeats``
rounds; the medians are compared. Results (machine, parameters, per-repeat
times, medians, ratio) are written as JSON.

``--full-size`` builds the released architecture with random weights (the
real weights are gated; compute does not depend on their values), runs both
sides under bf16 autocast at 1, 10 and 50 concepts, and reports model FLOPs
per image (``torch.utils.flop_counter.FlopCounterMode``) and the achieved
fraction of ``--peak-tflops`` (bf16 dense peak; 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("benchmarks.engine")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from a source checkout
    sys.path.insert(0, str(ROOT))

PROMPTS = [
    "person", "car", "dog", "cat", "tree", "building", "bicycle", "bird", "boat",
    "traffic light", "chair", "bottle", "cup", "horse", "sheep", "umbrella", "bench",
    "truck", "bus", "kite", "clock", "vase", "book", "laptop", "phone",
]  # fmt: skip


# --------------------------------------------------------------------------- inputs


def make_images(n: int, max_side: int) -> list[np.ndarray]:
    """n scenes of mixed sizes and aspect ratios, long side <= max_side.

    Pictures from :func:`sam3ray.demo.images.synthetic_scene` (the project's one
    scene generator: a gradient with a few rectangles and ellipses, per seed).
    """
    from sam3ray.demo.images import synthetic_scene

    rng = np.random.default_rng(1234)
    images = []
    for i in range(n):
        long = int(rng.integers(max_side // 2, max_side + 1))
        short = int(long * rng.uniform(0.5, 1.0))
        h, w = (short, long) if i % 2 == 0 else (long, short)
        images.append(synthetic_scene(i, (h, w)))
    return images


def make_concepts(n: int):
    from sam3ray.core.types import Concept, ConceptSet

    texts = [PROMPTS[i] if i < len(PROMPTS) else f"object {i}" for i in range(n)]
    return ConceptSet(
        tuple(Concept(f"00000000-0000-4000-8000-{i:012d}", t, (t,)) for i, t in enumerate(texts))
    )


# --------------------------------------------------------------------------- runners


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, bf16: bool):
    import torch

    if bf16:
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_engine(engine, images: list[np.ndarray], batch: int) -> int:
    n = 0
    for s in range(0, len(images), batch):
        n += sum(len(d) for d in engine.predict(images[s : s + batch]))
    return n


def run_reference(
    processor, pil_images, texts: list[str], device: str, bf16: bool, encode: bool = False
) -> int:
    """The official loop; with ``encode``, plus what storing its labels takes: each
    kept mask to the host and COCO RLE by pycocotools (the engine's output is RLE)."""
    import torch
    from pycocotools import mask as mask_utils

    n = 0
    with torch.inference_mode(), autocast(device, bf16):
        for img in pil_images:
            state = processor.set_image(img)
            for text in texts:
                processor.reset_all_prompts(state)
                state = processor.set_text_prompt(text, state)
                n += len(state["scores"])
                if encode and len(state["scores"]):
                    masks = state["masks"][:, 0].cpu().numpy().astype(np.uint8)
                    mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return n


def timed(fn, device: str) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds over all threads, result)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def flops_per_image(fn, n_images: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / n_images


def compare(
    model,
    resolution: int,
    images: list[np.ndarray],
    n_concepts: int,
    args: argparse.Namespace,
    device: str,
    bf16: bool,
    count_flops: bool,
) -> dict[str, Any]:
    """Warm up both sides, then alternate (a)/(b) for args.repeats rounds."""
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    from sam3ray.config import InferenceConfig
    from sam3ray.model.engine import Sam3Engine

    concepts = make_concepts(n_concepts)
    texts = [c.texts[0] for c in concepts]
    cfg = InferenceConfig(conf=args.conf, queries_per_forward=args.queries_per_forward)
    engine = Sam3Engine(
        model,
        concepts,
        cfg,
        device=device,
        dtype="bfloat16" if bf16 else "float32",
        resolution=resolution,
    )
    processor = Sam3Processor(
        model, resolution=resolution, device=device, confidence_threshold=args.conf
    )
    pil_images = [Image.fromarray(im) for im in images]

    def side_a():
        return run_engine(engine, images, args.batch)

    def side_b():
        return run_reference(processor, pil_images, texts, device, bf16)

    def side_c():
        return run_reference(processor, pil_images, texts, device, bf16, encode=True)

    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    warm_a, _, det_a = timed(side_a, device)
    peak_bytes = None
    if device.startswith("cuda"):
        peak_bytes = torch.cuda.max_memory_allocated() - before
    warm_b, _, det_b = timed(side_b, device)
    timed(side_c, device)
    logger.info(
        "concepts=%d warm-up: engine %.2fs (%d detections), reference %.2fs (%d detections)",
        n_concepts,
        warm_a,
        det_a,
        warm_b,
        det_b,
    )
    times_a, times_b, cpu_a, cpu_b, times_c = [], [], [], [], []
    for r in range(args.repeats):
        ta, ca, _ = timed(side_a, device)
        tb, cb, _ = timed(side_b, device)
        times_c.append(timed(side_c, device)[0])
        times_a.append(ta)
        times_b.append(tb)
        cpu_a.append(ca)
        cpu_b.append(cb)
        logger.info(
            "concepts=%d repeat %d: engine %.3fs (cpu %.3fs), reference %.3fs (cpu %.3fs)",
            n_concepts,
            r,
            ta,
            ca,
            tb,
            cb,
        )
    med_a, med_b = statistics.median(times_a), statistics.median(times_b)
    n = len(images)
    result: dict[str, Any] = {
        "concepts": n_concepts,
        "engine": {
            "warmup_s": warm_a,
            "times_s": times_a,
            "cpu_times_s": cpu_a,
            "median_s": med_a,
            "median_cpu_s": statistics.median(cpu_a),
            "images_per_s": n / med_a,
            "detections": det_a,
        },
        "reference": {
            "warmup_s": warm_b,
            "times_s": times_b,
            "cpu_times_s": cpu_b,
            "median_s": med_b,
            "median_cpu_s": statistics.median(cpu_b),
            "images_per_s": n / med_b,
            "detections": det_b,
        },
        "reference_with_rle": {
            "times_s": times_c,
            "median_s": statistics.median(times_c),
            "images_per_s": n / statistics.median(times_c),
        },
        "speedup": med_b / med_a,
        "speedup_vs_reference_with_rle": statistics.median(times_c) / med_a,
        # CPU seconds are less sensitive than wall time to other load on a shared machine.
        "speedup_cpu_time": statistics.median(cpu_b) / statistics.median(cpu_a),
        "engine_stats": {
            k: v for k, v in vars(engine.stats).items() if k not in ("infer_s", "host_s")
        },  # cumulative over warm-up + repeats
    }
    plan = engine.batch_plan()
    result["engine"]["batch_plan"] = {
        "images_per_batch": plan.images_per_batch,
        "queries_per_forward": plan.queries_per_forward,
        "reason": plan.reason,
        "activation_sizes": plan.sizes.to_dict() if plan.sizes else None,
    }
    if peak_bytes is not None:  # the warm-up pass: activations above the weights, per batch
        result["engine"]["peak_activation_mib"] = round(peak_bytes / 2**20, 1)
    if count_flops:
        # FLOPs of one pass over all images (steady state: text features cached).
        fa = flops_per_image(side_a, n)
        fb = flops_per_image(side_b, n)
        result["engine"]["flops_per_image"] = fa
        result["reference"]["flops_per_image"] = fb
        for side, f in (("engine", fa), ("reference", fb)):
            achieved = f * result[side]["images_per_s"]
            result[side]["achieved_tflops"] = achieved / 1e12
            if args.peak_tflops and device.startswith("cuda"):
                result[side]["mfu"] = achieved / (args.peak_tflops * 1e12)
    return result


# --------------------------------------------------------------------------- main


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        # The machine may be shared: a high load average makes CPU timings noisy.
        "loadavg_1_5_15": list(os.getloadavg()),
    }
    try:
        from importlib.metadata import version

        info["sam3"] = version("sam3")
    except Exception:  # pragma: no cover - informational only
        info["sam3"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_model(args: argparse.Namespace, device: str, tmp: str):
    """(model, resolution, description) for the tiny/checkpoint or the full-size random model."""
    import torch

    from sam3ray.model import compat

    compat.ensure()
    if args.full_size:
        from sam3ray.model.arch import Sam3Arch, build_image_model
        from sam3ray.model.tiny import init_uninitialised

        arch = Sam3Arch.full()
        model = build_image_model(arch)
        init_uninitialised(model, torch.Generator().manual_seed(0))
        return model.to(device), arch.resolution, "full-size architecture, random weights"
    from sam3ray.model.loader import load_checkpoint_into_new_model, resolve_checkpoint
    from sam3ray.model.tiny import make_tiny_checkpoint

    checkpoint = args.checkpoint or str(make_tiny_checkpoint(Path(tmp) / "sam3-tiny.pt", seed=0))
    path = resolve_checkpoint(checkpoint)
    model, info = load_checkpoint_into_new_model(path)
    return model.to(device), info.arch.resolution, info.model_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--concepts", type=int, default=10)
    p.add_argument("--checkpoint", default=None, help="default: a tiny random-weight SAM 3")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch", type=int, default=8, help="images per engine.predict call")
    p.add_argument("--queries-per-forward", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--conf", type=float, default=0.4)
    p.add_argument("--max-side", type=int, default=480, help="largest image side")
    p.add_argument("--full-size", action="store_true", help="released architecture (GPU only)")
    p.add_argument("--full-concepts", default="1,10,50", help="concept counts for --full-size")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM)")
    p.add_argument(
        "--flops", action="store_true", help="also count FLOPs (always on with --full-size)"
    )
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (the median of fewer is not robust)")
    if args.max_side < 96:  # the scene generator needs both sides above 20 px
        p.error("--max-side must be at least 96")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    import torch

    from sam3ray.model.device import resolve_device

    device = resolve_device(args.device)
    if args.full_size and not device.startswith("cuda"):
        print(
            "--full-size needs a CUDA GPU: the released architecture (840 M parameters) takes "
            "~45 s per image backbone on CPU. Run without --full-size for the tiny model.",
            file=sys.stderr,
        )
        return 2
    bf16 = args.full_size
    kind = "full" if args.full_size else "tiny" if not args.checkpoint else "checkpoint"
    out = Path(
        args.out
        or ROOT
        / "benchmarks"
        / "results"
        / f"engine-{'gpu' if device != 'cpu' else 'cpu'}{'-full' if args.full_size else ''}.json"
    )
    images = make_images(args.images, args.max_side)
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, resolution, model_desc = load_model(args, device, tmp)
        load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model %s: %.1f M parameters, %d px, loaded in %.1fs",
        model_desc,
        n_params / 1e6,
        resolution,
        load_s,
    )
    concept_counts = (
        [int(c) for c in args.full_concepts.split(",")] if args.full_size else [args.concepts]
    )
    runs = []
    with torch.inference_mode():
        for n_concepts in concept_counts:
            runs.append(
                compare(
                    model,
                    resolution,
                    images,
                    n_concepts,
                    args,
                    device,
                    bf16,
                    count_flops=args.full_size or args.flops,
                )
            )
    report = {
        "benchmark": "engine-vs-reference",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device),
        "params": {
            "model": kind,
            "model_id": model_desc,
            "parameters": n_params,
            "resolution": resolution,
            "images": args.images,
            "image_sizes": [list(im.shape[:2]) for im in images],
            "batch": args.batch,
            "queries_per_forward": args.queries_per_forward,
            "conf": args.conf,
            "repeats": args.repeats,
            "bf16_autocast": bf16,
            "peak_tflops": args.peak_tflops if args.full_size else None,
            "load_s": load_s,
        },
        "loadavg_1_5_15_before": load_before,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{kind} model, {args.images} images, device {device}, torch {torch.__version__}")
    print(
        f"{'concepts':>8}  {'engine img/s':>12}  {'reference img/s':>15}  {'ratio':>6}  "
        f"{'cpu-time ratio':>14}  notes"
    )
    for r in runs:
        note = ""
        if "mfu" in r["engine"]:
            note = (
                f"engine {r['engine']['flops_per_image'] / 1e12:.2f} TFLOP/img, "
                f"MFU {100 * r['engine']['mfu']:.1f}%; reference "
                f"{r['reference']['flops_per_image'] / 1e12:.2f} TFLOP/img, "
                f"MFU {100 * r['reference']['mfu']:.1f}%"
            )
        elif "flops_per_image" in r["engine"]:
            note = (
                f"engine {r['engine']['flops_per_image'] / 1e9:.2f} GFLOP/img, "
                f"reference {r['reference']['flops_per_image'] / 1e9:.2f} GFLOP/img"
            )
        rle = r["reference_with_rle"]
        note = (
            f"reference + RLE {rle['images_per_s']:.2f} img/s "
            f"({r['speedup_vs_reference_with_rle']:.2f}x)" + (f"; {note}" if note else "")
        )
        print(
            f"{r['concepts']:>8}  {r['engine']['images_per_s']:>12.2f}  "
            f"{r['reference']['images_per_s']:>15.2f}  {r['speedup']:>5.2f}x  "
            f"{r['speedup_cpu_time']:>13.2f}x  {note}"
        )
    load_after = os.getloadavg()[0]
    if device == "cpu" and max(load_before[0], load_after) > (os.cpu_count() or 1):
        print(
            f"note: load average {load_before[0]:.1f} -> {load_after:.1f} on {os.cpu_count()} "
            "CPUs: other processes shared the CPU, wall-clock numbers are noisy"
        )
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
