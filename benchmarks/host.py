"""Host time per image — everything but the model forward — old path vs new, side by side.

    python benchmarks/host.py [--detections 10,100,300 --size 1036x777 --repeats 7
                               --out benchmarks/results/host-cpu.json]

A GPU at the physical limit spends ~9 ms per image at 10 concepts (full SAM 3); all
the actor does besides the forward must fit in that, or the GPU waits. This script
feeds both post-processing paths the same synthetic grounding output of one image
(10 concepts × 200 decoder queries, full-size mask logits 288×288 in bfloat16,
``--detections`` candidates above the threshold as blobs on a grid so NMS keeps
them all, the rest below it) and times each phase on one CPU thread:

old path (the engine before issue 12, copied below verbatim): per-candidate Python
objects, the per-class NMS loop (a host sync per class), masks upsampled and
thresholded on the device (*device compute*, not host time), every full mask
copied to the host and encoded by pycocotools, a Detection per mask, a dict per
row, ``detections_table``.

new path (``Sam3Engine._select``, ``model.batches.finish_batch``, ``PendingBatch.result``,
``stages.rows.batch_detections_table``): candidates stay tensors, one batched
NMS, masks upsampled, thresholded and run-length encoded on the device, one
device→host copy, COCO strings vectorised over the batch, columns to Arrow.
Its device phase is run twice: with the real tensors (its compute, here on the
CPU) and with 8×8 mask logits and a 16-px mask grid (same candidates, same
code, near-empty tensors), which leaves what the host spends issuing it (Python,
dispatch): counted as host time.

Host time per image = host phases (+ the new path's issue overhead). Not measured
here (no GPU): the old path's device→host copy of full masks (N × h × w bytes:
80 MB at 100 detections, ~7 ms at 12 GB/s) and kernel launch latency.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from a source checkout
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.host")

N_CONCEPTS = 10
NUM_QUERIES = 200  # full SAM 3's decoder queries per prompt
MASK_RES = 288  # full SAM 3's mask logits at 1008 px
CONF = 0.4
ISSUE_GRID = 16


# --------------------------------------------------------------------------- inputs


def concepts():
    from sam3ray import Concept, ConceptSet

    return ConceptSet(
        tuple(
            Concept(f"00000000-0000-4000-8000-{i + 1:012d}", f"concept{i}", (f"text{i}",))
            for i in range(N_CONCEPTS)
        )
    )


def grounding_output(n_detections: int, seed: int = 0, res: int = MASK_RES) -> dict[str, Any]:
    """One image's pack output: [10, 200, ...] with ``n_detections`` candidates above
    CONF spread over the concepts, on a grid of non-overlapping boxes, each with a blob
    mask inside its box; everything else scores below CONF."""
    import torch

    rng = np.random.default_rng(seed)
    q, nq = N_CONCEPTS, NUM_QUERIES
    logits = torch.full((q, nq, 1), -6.0)
    boxes = torch.rand((q, nq, 4), generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.25
    masks = torch.full((q, nq, res, res), -8.0, dtype=torch.bfloat16)
    cols = int(np.ceil(np.sqrt(n_detections * 4 / 3)))
    rows = int(np.ceil(n_detections / cols))
    yy, xx = np.mgrid[0:res, 0:res] / res
    for k in range(n_detections):
        qi, di = k % q, k // q
        r, c = divmod(k, cols)
        cx, cy = (c + 0.5) / cols, (r + 0.5) / rows
        w, h = rng.uniform(0.5, 0.9) / cols, rng.uniform(0.5, 0.9) / rows
        boxes[qi, di] = torch.tensor([cx, cy, w, h])
        logits[qi, di, 0] = float(rng.uniform(0.5, 4.0))
        blob = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2
        masks[qi, di] = torch.from_numpy(4.0 * (1.0 - blob)).clamp(-8, 8).to(torch.bfloat16)
    return {
        "pred_logits": logits,
        "presence_logit_dec": torch.full((q, 1), 6.0),
        "pred_boxes": boxes,
        "pred_masks": masks,
    }


# --------------------------------------------------------------------------- old path


class Clock:
    """Accumulates seconds per phase."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.s[phase] = self.s.get(phase, 0.0) + now - self._t
        self._t = now


def old_path(engine, out, queries, size, info, clock: Clock):
    """The engine's post-processing before issue 12 (sam3ray/model/engine.py at 55625a7:
    ``_ground`` after the forward, ``_finish``), then the row builder. Device compute
    (upsample + threshold + layout) is clocked apart from the host's work."""
    import torch
    import torch.nn.functional as F
    from sam3.model.box_ops import box_cxcywh_to_xyxy

    from sam3ray.core.masks import encode_rle_fortran
    from sam3ray.core.types import Detection
    from sam3ray.output.schema import detections_table
    from sam3ray.stages.rows import detection_rows

    cfg, by_id = engine.config, engine.concepts.by_id
    clock.lap("idle")
    # --- _ground, after the forward
    probs = out["pred_logits"].float().sigmoid().squeeze(-1)
    probs = probs * out["presence_logit_dec"].float().sigmoid()
    boxes = out["pred_boxes"].float()
    pred_masks = out["pred_masks"]
    thresholds = torch.tensor([engine._threshold(q.class_id) for q in queries])
    keep = (probs >= thresholds[:, None]).nonzero()
    q_idx, d_idx = keep[:, 0], keep[:, 1]
    kept_scores = probs[q_idx, d_idx].tolist()
    kept_boxes = boxes[q_idx, d_idx]
    clock.lap("host")
    kept_masks = pred_masks[q_idx, d_idx]  # a gather of N × 288 × 288 on the device
    clock.lap("device")
    cands = []
    for j, qi in enumerate(q_idx.tolist()):
        q = queries[qi]
        cands.append((q.class_id, q, kept_scores[j], kept_boxes[j], kept_masks[j]))
    # --- _finish
    h, w = size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    boxes = box_cxcywh_to_xyxy(torch.stack([c[3] for c in cands])) * scale
    scores = torch.tensor([c[2] for c in cands])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    kept: list[int] = []
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        by_class.setdefault(c[0], []).append(i)
    for idx in by_class.values():
        if cfg.nms and len(idx) > 1:
            sel = torch.tensor(idx)
            k = torch.ops.torchvision.nms(boxes[sel], scores[sel], float(cfg.iou))
            kept.extend(sel[k].tolist())
        else:
            kept.extend(idx)
    kept.sort(key=lambda i: (-cands[i][2], i))
    kept = kept[: cfg.max_det]
    step = max(1, 64_000_000 // max(1, h * w))
    encoded: list[tuple[bytes, int]] = []
    clock.lap("host")
    for s in range(0, len(kept), step):
        low = torch.stack([cands[i][4] for i in kept[s : s + step]]).float()
        up = F.interpolate(low[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]
        binary = (up > 0).to(torch.uint8).transpose(1, 2).contiguous()
        clock.lap("device")
        binary = binary.cpu().numpy()
        encoded.extend(encode_rle_fortran(binary.transpose(2, 1, 0)))
        clock.lap("host")
    dets = []
    box_list = boxes.cpu().tolist()
    for i, (rle, area) in zip(kept, encoded):
        c = cands[i]
        dets.append(
            Detection(
                c[0], by_id[c[0]].name, c[1].label, c[2], tuple(box_list[i]), rle, (h, w), area
            )
        )
    table = detections_table(detection_rows(info, dets))
    clock.lap("host")
    return table


# --------------------------------------------------------------------------- new path


def new_path(engine, out, queries, size, info, clock: Clock, ctx=None):
    """The engine's post-processing now, then the columnar row builder (``ctx``: the
    batch context, by default the engine's)."""
    from sam3ray.model.batches import finish_batch
    from sam3ray.stages.rows import batch_detections_table

    clock.lap("idle")
    found = [engine._select(out, queries, 0)]
    pending = finish_batch(found, [size], queries, ctx or engine._batch_context)
    clock.lap("device")
    table = batch_detections_table([info], pending.result())
    clock.lap("host")
    return table


# --------------------------------------------------------------------------- main


def measure(engine, n: int, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    from sam3ray.core.masks import decode_rle
    from sam3ray.model.queries import build_queries
    from sam3ray.stages.rows import InputInfo

    out = grounding_output(n)
    small = grounding_output(n, res=8)  # the same candidates with 8×8 mask logits
    queries = build_queries(engine.concepts, None, [size], 1)
    info = InputInfo("run", "img", "s3://b/img.jpg", size[1], size[0], "sam3@x")
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": [], "new_issue": []}
    tables = {}
    capped = replace(  # the same code, near-empty tensors: a 16-px mask grid
        engine._batch_context, config=engine.config.model_copy(update={"max_imgsz": ISSUE_GRID})
    )
    for r in range(repeats + 1):  # the first round warms up
        for name, fn in (("old", old_path), ("new", new_path)):
            clock = Clock()
            tables[name] = fn(engine, out, queries, size, info, clock)
            if r:
                runs[name].append(clock.s)
        clock = Clock()
        new_path(engine, small, queries, size, info, clock, ctx=capped)
        if r:
            runs["new_issue"].append(clock.s)
    old, new = tables["old"], tables["new"]
    assert old.num_rows == new.num_rows == n, (old.num_rows, new.num_rows, n)
    same = old.drop(["created_at"]).equals(new.drop(["created_at"]))
    assert same, "the two paths disagree"
    rles, grids = new.column("mask_rle").to_pylist()[:3], new.column("mask_size").to_pylist()[:3]
    masks = [decode_rle(c, s) for c, s in zip(rles, grids)]
    med = {
        name: {
            ph: statistics.median(x.get(ph, 0.0) for x in rs) * 1000 for ph in ("host", "device")
        }
        for name, rs in runs.items()
    }
    return {
        "detections": n,
        "image": f"{size[1]}x{size[0]}",
        "identical_tables": same,
        "mask_area_examples": [int(m.sum()) for m in masks],
        "old": {
            "host_ms": round(med["old"]["host"], 2),
            "device_compute_ms_on_cpu": round(med["old"]["device"], 2),
        },
        "new": {
            "host_ms": round(med["new"]["host"] + med["new_issue"]["device"], 2),
            "host_phase_ms": round(med["new"]["host"], 2),
            "device_issue_ms": round(med["new_issue"]["device"], 2),
            "device_compute_ms_on_cpu": round(med["new"]["device"], 2),
        },
        "runs_ms": {
            k: [{p: round(t * 1000, 3) for p, t in x.items()} for x in v] for k, v in runs.items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--detections", default="10,100,300")
    p.add_argument("--size", default="1036x777", help="image width x height")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "host-cpu.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from sam3ray import InferenceConfig
    from sam3ray.model.engine import Sam3Engine
    from sam3ray.model.tiny import make_tiny_checkpoint

    torch.set_num_threads(1)  # "on one core"
    w, h = (int(v) for v in args.size.lower().split("x"))
    load0 = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_checkpoint(Path(tmp) / "sam3-tiny.pt", seed=0))
        cfg = InferenceConfig(conf=CONF, iou=0.7, nms=True, max_det=300)
        # A real engine (the tiny model: its forward is not run here) for the new path's code.
        engine = Sam3Engine.from_checkpoint(ckpt, concepts(), cfg, device="cpu")
        results = [
            measure(engine, int(n), (h, w), args.repeats) for n in args.detections.split(",")
        ]
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_1_5_15_start": load0,
            "loadavg_1_5_15_end": list(os.getloadavg()),
            "shared": "this machine is shared (2 cores, 3 users): medians of "
            f"{args.repeats} repeats",
        },
        "goal_ms_per_image_at_100_detections": 5.0,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'detections':>10} {'old host ms':>12} {'new host ms':>12} {'(phase+issue)':>15} "
          f"{'old dev ms':>11} {'new dev ms':>11}")  # fmt: skip
    for r in results:
        o, n = r["old"], r["new"]
        print(
            f"{r['detections']:>10} {o['host_ms']:>12.2f} {n['host_ms']:>12.2f} "
            f"{n['host_phase_ms']:>7.2f}+{n['device_issue_ms']:<7.2f} "
            f"{o['device_compute_ms_on_cpu']:>11.1f} {n['device_compute_ms_on_cpu']:>11.1f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
