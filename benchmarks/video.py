"""Video tracking actor: throughput and memory on CPU with the tiny video model.

Measures what a ``TrackStage`` (the body of a Ray video actor) does, each
measurement in a fresh subprocess so peak RSS belongs to it alone:

1. frames/s per actor on one video (tracking only; decode reported apart);
2. peak RSS on a video and on one 4x longer (goal: within 15%): memory must
   depend on the shard, not on the video;
3. RSS after shard 5 and after shard 50 in a row (goal: growth under 10%):
   nothing may carry over between shards.

Usage: ``python benchmarks/video.py [--dtype auto|float32|bfloat16]
[--out benchmarks/results/video-cpu.json]``.
``--dtype`` is ``model.dtype`` (``auto``: float32 on CPU); the JSON records it
(``dtype``, and ``dtype_resolved`` as the model ran) so bf16 and float32 runs
can be compared. No GPU numbers: the run records whether CUDA was available.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procmem import peak_rss_mb  # benchmarks/ is sys.path[0] when run as a script

logger = logging.getLogger("benchmarks.video")

DISC = "0b0c7f5e-0000-4000-8000-0000000000a1"
SIZE = (144, 192)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _video_config(shard_frames: int, overlap: int):
    from sam3ray.config import VideoConfig

    return VideoConfig(shard_frames=shard_frames, overlap_frames=overlap, frame_stride=1)


def _stage(ckpt: str, video: str, shard_frames: int, overlap: int, dtype: str):
    from sam3ray.config import InferenceConfig, InputConfig, ModelConfig, ResourcesConfig
    from sam3ray.core.types import Concept, ConceptSet
    from sam3ray.stages.track import TrackStage

    concepts = ConceptSet((Concept(DISC, "disc", ("blue disc",)),))
    stage = TrackStage(
        ModelConfig(checkpoint=ckpt, device="cpu", dtype=dtype),
        InferenceConfig(conf=0.0),
        _video_config(shard_frames, overlap),
        InputConfig(uris=[video]),
        ResourcesConfig(gpus_per_actor=0),
        concepts,
        run_id="bench",
    )
    stage.setup()
    return stage


def _shards(video: str, shard_frames: int, overlap: int):
    from sam3ray.core.shards import InputRef
    from sam3ray.plan.video import video_shards
    from sam3ray.sources.video import probe_video
    from sam3ray.storage.location import Location

    info = probe_video(Location(video))
    return video_shards(InputRef.of(video), info, _video_config(shard_frames, overlap))


def child(
    mode: str, ckpt: str, video: str, shard_frames: int, overlap: int, repeat: int, dtype: str
) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    from sam3ray.stages.tasks import ShardTask

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    stage = _stage(ckpt, video, shard_frames, overlap, dtype)
    shards = _shards(video, shard_frames, overlap)
    rss_after_load = _rss_mb()
    frames = infer_ms = decode_ms = 0.0
    rss_trace = []
    for _ in range(repeat):
        for s in shards:
            result = stage.process(ShardTask(s, tuple(c.class_id for c in stage.concepts)))
            img = result.images.to_pylist()[0]
            assert img["status"] == "ok", img
            frames += len(s.span.frames)
            infer_ms += img["infer_ms"]
            decode_ms += img["decode_ms"]
            rss_trace.append(round(_rss_mb(), 1))
    return {
        "mode": mode,
        "dtype": stage.tracker.dtype,
        "shards": len(shards) * repeat,
        "frames": int(frames),
        "frames_per_s": round(frames / (infer_ms / 1000), 2),
        "decode_frames_per_s": round(frames / (decode_ms / 1000), 1),
        "rss_after_load_mb": round(rss_after_load, 1),
        "peak_rss_mb": peak_rss_mb(),
        "rss_trace_mb": rss_trace,
    }


def _run_child(*args) -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/video-cpu.json")
    parser.add_argument("--frames", type=int, default=48, help="frames of the short video")
    parser.add_argument("--shard-frames", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="model.dtype of the video model (auto: float32 on CPU)",
    )
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, ckpt, video, sf, ov, rep, dtype = args.child
        print(json.dumps(child(mode, ckpt, video, int(sf), int(ov), int(rep), dtype)))
        return

    import torch

    from sam3ray.demo.videos import write_video
    from sam3ray.model.tiny_video import make_tiny_video_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_video_checkpoint(Path(tmp) / "tiny-video.pt"))
        short = str(write_video(Path(tmp) / "short.mp4", args.frames, SIZE))
        long = str(write_video(Path(tmp) / "long.mp4", 4 * args.frames, SIZE))
        tiny = str(write_video(Path(tmp) / "tiny.mp4", 8, SIZE))
        sf, ov, dtype = args.shard_frames, args.overlap, args.dtype
        logger.info("short video ...")
        short_res = _run_child("short", ckpt, short, sf, ov, 1, dtype)
        logger.info("4x longer video ...")
        long_res = _run_child("long_4x", ckpt, long, sf, ov, 1, dtype)
        logger.info("50 shards in a row ...")
        many = _run_child("50_shards", ckpt, tiny, 8, 0, 50, dtype)
    peak_ratio = long_res["peak_rss_mb"] / short_res["peak_rss_mb"]
    trace = many["rss_trace_mb"]
    growth = trace[-1] / trace[4]
    result = {
        "benchmark": "video tracking actor (TrackStage), tiny SAM 3 video model, CPU",
        "model": "tiny random-weight video model (336 px, 8 queries, hotstart off), 1 concept",
        "dtype": args.dtype,
        "dtype_resolved": short_res["dtype"],
        "video": f"moving shapes {SIZE[1]}x{SIZE[0]} H.264, shards of {sf} frames, overlap {ov}",
        "frames_per_s_per_actor": short_res["frames_per_s"],
        "frames_per_s_per_actor_long": long_res["frames_per_s"],
        "decode_frames_per_s": short_res["decode_frames_per_s"],
        "peak_rss_mb": {"short": short_res["peak_rss_mb"], "long_4x": long_res["peak_rss_mb"]},
        "peak_rss_ratio_long_vs_short": round(peak_ratio, 3),
        "goal_peak_within_15pct": peak_ratio <= 1.15,
        "rss_after_shard_5_mb": trace[4],
        "rss_after_shard_50_mb": trace[-1],
        "rss_growth_5_to_50": round(growth, 3),
        "goal_growth_under_10pct": growth <= 1.10,
        "runs": [short_res, long_res, many],
        "gpu": "not available this session: no GPU numbers (CPU only)",
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": int(os.environ.get("BENCH_THREADS", "1")),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_at_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    logger.info(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
