"""Label Studio export: brush vs polygon time at 2,500 / 5,000 / 10,000 detections.

    python benchmarks/labelstudio_export.py [--source OUTPUT] [--out benchmarks/results/...]

The promise checked: export time is linear in detections and the polygon export
stays within 3× of the brush export (it was 58×: 10 min 41 s vs 11 s for the
demo's 2,085 masks, ~75% of it in ``skimage.measure.approximate_polygon`` over
~220 contours per mask, holes included).

Masks are SAM 3's own: the tiny random-weight model's detections on the demo's
sample images (``--source`` reuses a job output, e.g. ``out/local-demo`` after
``sam3ray demo``; otherwise the engine runs here on the sample images, as
``configs/local-demo.yaml`` would). Random weights make ragged, speckled masks
with many holes: the worst case for polygons. They are replicated (as more
images) up to each size and written through the real writer; each export then
runs as the CLI runs it. Reported besides time: regions, vertices, the loss the
export reports (holes, left-out parts), and the IoU of the polygons, rasterised
by pycocotools as COCO tools and Label Studio's converter do, against the
masks (not timed). The previous implementation (marching squares +
``approximate_polygon`` on every contour) is timed on a sample for comparison.
"""

from __future__ import annotations

import argparse
import json
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

SIZES = (2_500, 5_000, 10_000)
LEGACY_SAMPLE = 200


def source_detections(source: str | None, work: Path) -> list[dict[str, Any]]:
    """Detection rows (uri, class_id, concept, score, mask, size) of the demo's images."""
    import pyarrow.dataset as pds

    if source:
        table = pds.dataset(f"{source}/detections", format="parquet", partitioning="hive")
        return table.to_table().to_pylist()
    from sam3ray.config import InferenceConfig
    from sam3ray.demo.images import write_sample_images
    from sam3ray.model.engine import Sam3Engine
    from sam3ray.model.tiny import make_tiny_checkpoint
    from sam3ray.sources.images import decode_image
    from sam3ray.sources.prompts import load_concepts
    from sam3ray.storage.location import Location

    ckpt = make_tiny_checkpoint(work / "sam3-tiny.pt", seed=0)
    paths = write_sample_images(work / "images")
    concepts = load_concepts(Location(str(ROOT / "configs" / "concepts-demo.csv")))
    inference = InferenceConfig(conf=0.4, max_det=100, images_per_batch=4)
    engine = Sam3Engine.from_checkpoint(str(ckpt), concepts, inference, device="cpu")
    rows = []
    for path in paths:
        image = decode_image(Path(path).read_bytes(), max_pixels=10**9)
        for d in engine.predict([image])[0]:
            rows.append({"uri": str(path), "class_id": d.class_id, "concept": d.concept,
                         "query": d.query, "score": d.score, "box": list(d.box),
                         "mask_rle": d.mask_rle, "mask_size": list(d.mask_size),
                         "area": d.area, "width": d.mask_size[1],
                         "height": d.mask_size[0]})  # fmt: skip
    return rows


def write_output(rows: list[dict[str, Any]], n: int, root: Path) -> None:
    """``n`` detections (``rows`` repeated as further images) through the real writer."""
    from collections import defaultdict

    from sam3ray.core.ids import input_id
    from sam3ray.output.schema import detections_table, images_table
    from sam3ray.output.writer import ShardOutput, ShardWriter
    from sam3ray.storage.location import Location

    per_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        per_image[r["uri"]].append(r)
    columns = ("uri", "class_id", "concept", "query", "score", "box", "mask_rle", "mask_size",
               "area", "width", "height")  # fmt: skip
    images: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    left, copy = n, 0
    while left > 0:
        for uri in sorted(per_image):
            mine = per_image[uri][:left]
            if not mine:
                break
            image_id = input_id(f"{uri}#copy{copy}")
            dets = [{k: r[k] for k in columns} | {"run_id": "bench", "image_id": image_id,
                    "model": "tiny"} for r in mine]  # fmt: skip
            img = {"run_id": "bench", "image_id": image_id, "uri": uri, "status": "ok",
                   "n_detections": len(mine), "width": mine[0]["width"],
                   "height": mine[0]["height"]}  # fmt: skip
            images.append((img, dets))
            left -= len(mine)
        copy += 1
    writer = ShardWriter(Location(str(root)))
    for start in range(0, len(images), 40):
        shard = f"s{start:06d}"
        chunk = images[start : start + 40]
        imgs = [{**img, "shard_id": shard} for img, _ in chunk]
        dets = [d for _, ds in chunk for d in ds]
        writer.write(ShardOutput(shard, "bench", detections_table(dets), images_table(imgs)))


def legacy_polygons(mask: Any, tolerance: float = 1.0) -> list[list[float]]:
    """The previous ``core.masks.mask_to_polygons`` (for comparison only)."""
    import numpy as np
    from skimage import measure

    h, w = mask.shape
    polygons = []
    for contour in measure.find_contours(np.pad(mask.astype(np.uint8), 1), 0.5):
        rc = measure.approximate_polygon(contour, tolerance) - 0.5
        x, y = rc[:, 1], rc[:, 0]
        if len(rc) < 4 or np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) <= 0:
            continue
        xy = np.stack([np.clip(x, 0, w), np.clip(y, 0, h)], axis=1)[:-1]
        polygons.append(np.round(xy, 2).ravel().tolist())
    return polygons


def polygon_quality(tasks_path: Path, source: list[dict[str, Any]]) -> dict[str, Any]:
    """Regions, vertices and IoU (pycocotools rasterisation) of an exported polygon file."""
    import numpy as np
    from pycocotools import mask as mask_utils

    masks = {(r["class_id"], round(float(r["score"]), 6), r["uri"]): r for r in source}
    tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    ious, regions, vertices, per_det = [], 0, [], []
    names = {r["concept"]: r["class_id"] for r in source}
    for task in tasks:
        uri = task["data"]["sam3ray_uri"]
        groups: dict[str, list[dict[str, Any]]] = {}
        for res in (r for p in task["predictions"] for r in p["result"]):
            groups.setdefault(res.get("parentID", res["id"]), []).append(res)
            regions += 1
            vertices.append(len(res["value"]["points"]))
        for parts in groups.values():
            first = parts[0]
            key = (names[first["value"]["polygonlabels"][0]], first["score"], uri)
            r = masks[key]
            h, w = r["mask_size"]
            polys = [(np.asarray(p["value"]["points"]) * [w / 100, h / 100]).ravel().tolist()
                     for p in parts]  # fmt: skip
            drawn = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            truth = {"counts": r["mask_rle"], "size": [h, w]}
            ious.append(float(mask_utils.iou([drawn], [truth], [0])[0][0]))
            per_det.append(len(parts))
    return {
        "regions": regions,
        "regions_per_detection_max": max(per_det),
        "vertices_per_region_max": max(vertices),
        "vertices_per_region_mean": round(float(np.mean(vertices)), 1),
        "iou_median": round(float(np.median(ious)), 4),
        "iou_p10": round(float(np.percentile(ious, 10)), 4),
        "iou_min": round(float(np.min(ious)), 4),
        "detections_checked": len(ious),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", help="a job output whose detections to use (e.g. out/local-demo)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per export")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/labelstudio-export-cpu.json"))
    args = p.parse_args(argv)

    from sam3ray.analytics.labelstudio import export_labelstudio
    from sam3ray.core.masks import decode_rle, outline_mask
    from sam3ray.storage.location import Location

    work = Path(tempfile.mkdtemp(prefix="sam3ray-ls-bench-"))
    t0 = time.perf_counter()
    rows = source_detections(args.source, work)
    print(f"{len(rows)} source detections ({time.perf_counter() - t0:.1f} s)", flush=True)
    result: dict[str, Any] = {
        "benchmark": "labelstudio_export",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },  # fmt: skip
        "source": args.source or "tiny SAM 3 (seed 0) on the demo's sample images, run here",
        "source_detections": len(rows),
        "sizes": {},
    }
    warm = work / "out-warm-up"  # imports (cv2, duckdb) and first-call costs, not timed
    write_output(rows, 50, warm)
    for fmt in ("rle", "polygon"):
        export_labelstudio(Location(str(warm)), Location(str(work / "warm.json")), fmt=fmt)
    for n in args.sizes:
        out = work / f"out-{n}"
        write_output(rows, n, out)
        entry: dict[str, Any] = {}
        for fmt in ("rle", "polygon"):
            best, done = float("inf"), None
            for _ in range(args.repeats):
                dest = work / f"tasks-{n}-{fmt}.json"
                t = time.perf_counter()
                done = export_labelstudio(Location(str(out)), Location(str(dest)), fmt=fmt)
                best = min(best, time.perf_counter() - t)
            entry[fmt] = {"seconds": round(best, 3), "ms_per_detection": round(best / n * 1e3, 3),
                          "tasks": done.tasks, "predictions": done.predictions,
                          "detections": done.detections, "results": done.results,
                          "file_mb": round(dest.stat().st_size / 2**20, 1)}  # fmt: skip
            if fmt == "polygon":
                loss = done.loss
                entry[fmt]["loss"] = {k: getattr(loss, k) for k in (
                    "mask_px", "holes", "hole_px", "dropped_parts", "dropped_px", "multi_part",
                    "max_tolerance")}  # fmt: skip
        entry["polygon_over_brush"] = round(
            entry["polygon"]["seconds"] / entry["rle"]["seconds"], 2
        )
        print(json.dumps({n: entry}), flush=True)
        result["sizes"][str(n)] = entry
    largest = max(args.sizes)
    result["polygon_quality"] = polygon_quality(work / f"tasks-{largest}-polygon.json", rows)
    sample = rows[:LEGACY_SAMPLE]
    masks = [decode_rle(r["mask_rle"], r["mask_size"]) for r in sample]
    t = time.perf_counter()
    for m in masks:
        legacy_polygons(m)
    legacy = (time.perf_counter() - t) / len(masks)
    t = time.perf_counter()
    for m in masks:
        outline_mask(m, min_part_px=16, max_parts=16)
    now = (time.perf_counter() - t) / len(masks)
    result["outline_per_mask_ms"] = {"previous": round(legacy * 1e3, 2), "now": round(now * 1e3, 2),
                                     "sample": len(masks)}  # fmt: skip
    per = [result["sizes"][str(n)]["polygon"]["ms_per_detection"] for n in args.sizes]
    result["linear"] = {"polygon_ms_per_detection": per,
                        "max_over_min": round(max(per) / min(per), 2)}  # fmt: skip
    ratio = result["sizes"][str(largest)]["polygon_over_brush"]
    result["pass"] = bool(ratio <= 3.0 and max(per) / min(per) <= 1.5)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("polygon_quality", "outline_per_mask_ms", "linear",
                                             "pass")}, indent=2))  # fmt: skip
    print(f"-> {args.out}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
