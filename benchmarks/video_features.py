"""Shared image features in the video actor: backbone once per frame vs once per visit.

sam3's video API takes one text prompt per session, so a shard with K concepts
is K passes over its frames, and sam3 recomputes a frame's image features on
every visit. ``video.feature_cache_mib`` (``model.video.shared_image_features``)
keeps them for the shard. This runs the same ``TrackStage`` on the same shards
with sharing on and off, alternating in one process (so both see the same
machine), at 1 and 5 concepts, and reports frames/s, backbone frames per shard
frame, the speed-up, and whether the detections are identical.

With ``--full-size`` it also sizes one frame's features for the full SAM 3
video architecture (random weights, on CPU), which is what ``video.feature_cache_mib``
must hold per cached frame on a GPU.

Usage: ``python benchmarks/video_features.py [--full-size] [--dtype auto|float32|bfloat16]
[--out FILE.json]`` (default ``benchmarks/results/video-features-cpu.json``).
``--dtype`` is ``model.dtype`` of the tiny model's runs (``auto``: float32 on CPU);
the JSON records it (``dtype``, and ``dtype_resolved`` as the model ran) so bf16
and float32 runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("benchmarks.video_features")

TEXTS = ("blue disc", "red square", "green triangle", "yellow star", "white ring")
SIZE = (144, 192)


def _concepts(k: int):
    from sam3ray.core.types import Concept, ConceptSet

    return ConceptSet(
        tuple(
            Concept(f"0b0c7f5e-0000-4000-8000-{i:012d}", t.split()[1], (t,))
            for i, t in enumerate(TEXTS[:k])
        )
    )


def _run(stage, shards, share: bool) -> tuple[float, int, int, list]:
    """(seconds, shard frames, backbone frames, detections) of one pass over ``shards``."""
    from sam3ray.stages.tasks import ShardTask

    backbone = stage.tracker.model.detector.backbone
    original, seen = backbone.forward_image, []

    def counting(images):
        seen.append(int(images.shape[0]))
        return original(images)

    stage.tracker.feature_cache_bytes = (4096 if share else 0) * 2**20
    backbone.forward_image = counting
    try:
        t0 = time.perf_counter()
        every = tuple(c.class_id for c in stage.concepts)
        outs = [stage.process(ShardTask(s, every)) for s in shards]
        seconds = time.perf_counter() - t0
    finally:
        del backbone.forward_image
    dets = []
    for out in outs:
        status = out.images.column("status").to_pylist()
        assert status == ["ok"], out.images.to_pylist()  # never time an error path
        table = out.staging.drop_columns(["created_at"])
        dets.extend(table.to_pylist())
    return seconds, sum(len(s.span.frames) for s in shards), sum(seen), dets


def full_size_features_mib() -> dict[str, float]:
    """One frame's image features of the full SAM 3 video model (random weights, CPU,
    float32): all of them, and what the cache keeps per frame after the first
    (positional encodings are shared). About a minute on 2 cores, 4 GB of RAM."""
    import torch

    from sam3ray.model import video_compat
    from sam3ray.model.video_arch import Sam3VideoArch, build_video_model

    video_compat.ensure()
    model = build_video_model(Sam3VideoArch.full()).eval()
    size = int(model.image_size)
    with torch.no_grad():
        out = model.detector.backbone.forward_image(torch.zeros(1, 3, size, size))
    sizes = {"all": 0, "pos_enc": 0}

    def walk(x, path: str) -> None:
        if isinstance(x, torch.Tensor):
            n = x.numel() * x.element_size()
            sizes["all"] += n
            sizes["pos_enc"] += n if "pos_enc" in path else 0
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk(out, "")
    return {
        "image_size": size,
        "all_mib": round(sizes["all"] / 2**20, 1),
        "cached_per_frame_mib": round((sizes["all"] - sizes["pos_enc"]) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/video-features-cpu.json")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--shard-frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--full-size", action="store_true", help="also size full SAM 3 features (~1 min, 4 GB)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="model.dtype of the tiny video model (auto: float32 on CPU)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from sam3ray.config import (
        InferenceConfig,
        InputConfig,
        ModelConfig,
        ResourcesConfig,
        VideoConfig,
    )
    from sam3ray.core.shards import InputRef
    from sam3ray.demo.videos import write_video
    from sam3ray.model.tiny_video import make_tiny_video_checkpoint
    from sam3ray.plan.video import video_shards
    from sam3ray.sources.video import probe_video
    from sam3ray.stages.track import TrackStage
    from sam3ray.storage.location import Location

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    t_start = time.perf_counter()
    rows = []
    dtype_resolved = None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_video_checkpoint(Path(tmp) / "tiny-video.pt"))
        video = str(write_video(Path(tmp) / "clip.mp4", args.frames, SIZE))
        video_cfg = VideoConfig(shard_frames=args.shard_frames, overlap_frames=0, frame_stride=1)
        shards = video_shards(InputRef.of(video), probe_video(Location(video)), video_cfg)
        for k in (1, 5):
            stage = TrackStage(
                ModelConfig(checkpoint=ckpt, device="cpu", dtype=args.dtype),
                InferenceConfig(conf=0.0),
                video_cfg,
                InputConfig(uris=[video]),
                ResourcesConfig(gpus_per_actor=0),
                _concepts(k),
                run_id="bench",
            )
            stage.setup()
            dtype_resolved = stage.tracker.dtype
            _run(stage, shards[:1], True)  # warm-up: first-call allocations
            times = {True: 0.0, False: 0.0}
            calls, frames, same = {}, 0, True
            for _ in range(args.repeats):
                for share in (True, False):
                    s, frames, calls[share], dets = _run(stage, shards, share)
                    times[share] += s
                    if share:
                        ref_dets = dets
                    else:
                        same = same and dets == ref_dets
            fps = {share: args.repeats * frames / times[share] for share in times}
            rows.append({
                "concepts": k,
                "frames_per_s_shared": round(fps[True], 2),
                "frames_per_s_per_visit": round(fps[False], 2),
                "speedup": round(fps[True] / fps[False], 2),
                "backbone_frames_per_frame_shared": round(calls[True] / frames, 2),
                "backbone_frames_per_frame_per_visit": round(calls[False] / frames, 2),
                "identical_detections": same,
                "detections": len(ref_dets),
            })  # fmt: skip
            logger.info(json.dumps(rows[-1]))
    result = {
        "benchmark": "video actor: shared image features vs recomputed per visit (tiny, CPU)",
        "video": f"moving shapes {SIZE[1]}x{SIZE[0]}, {args.frames} frames, "
        f"shards of {args.shard_frames}",
        "dtype": args.dtype,
        "dtype_resolved": dtype_resolved,
        "rows": rows,
        "full_size_features_float32": full_size_features_mib() if args.full_size else None,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_at_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    logger.info(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
