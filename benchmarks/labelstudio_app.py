"""A job output in the real Label Studio, both formats: counts, timings, images.

    python benchmarks/labelstudio_app.py sam3ray-demo/labels [--out benchmarks/results/...]

What a user does after a run, through Label Studio's REST API (the app started on
127.0.0.1 from its own venv, see ``tests/support/labelstudio.py``): export with
``--local-files-root``, create a project with the exported labelling config, add a
Local Files storage on the images' folder, import the tasks. Then, per format: tasks
and predictions Label Studio holds, regions and detections (top-level regions) against
the Parquet rows, every detection's label and score per image, brush masks read back
against the Parquet masks, and every task's image opened through Label Studio. Times:
export, import, and the largest task's region count (what the labelling page draws).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from a source checkout
    sys.path.insert(0, str(ROOT))


def parquet_rows(output: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Still-image detections and ok still images (image_id -> uri) of the output."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    det = pds.dataset(f"{output}/detections", format="parquet", partitioning="hive").to_table()
    det = det.filter(pc.is_null(det["frame_index"]))
    img = pds.dataset(f"{output}/images", format="parquet").to_table()
    ok = img.filter(pc.and_(pc.equal(img["status"], "ok"), pc.is_null(img["frame_start"])))
    return det.to_pylist(), dict(zip(ok["image_id"].to_pylist(), ok["uri"].to_pylist()))


def check_format(ls, output: str, fmt: str, root: Path, work: Path,
                 rows: list[dict[str, Any]], images: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    import numpy as np

    from sam3ray.analytics import categories
    from sam3ray.analytics.labelstudio import (
        brush_rle_to_mask,
        export_labelstudio,
        labeling_config,
    )
    from sam3ray.core.masks import decode_rle
    from sam3ray.storage.location import Location
    from tests.support.labelstudio import create_project, project_tasks

    out = Location(output)
    t = time.perf_counter()
    done = export_labelstudio(out, Location(str(work / f"{fmt}.json")), fmt=fmt,
                              local_files_root=str(root))  # fmt: skip
    export_s = time.perf_counter() - t
    tasks = json.loads((work / f"{fmt}.json").read_text(encoding="utf-8"))
    config = labeling_config(categories(out), fmt)
    storage = ("localfiles", {"path": done.storage_path, "use_blob_urls": False})
    t = time.perf_counter()
    project = create_project(ls, f"{Path(output).name} {fmt}", config, tasks, storage)
    import_s = time.perf_counter() - t
    stored = project_tasks(ls, project)
    names = {c.class_id: c.name for c in categories(out)}
    key = "brushlabels" if fmt == "rle" else "polygonlabels"
    by_image: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    regions = tops = mismatched = images_ok = masks_exact = 0
    most = 0
    for task in stored:
        image_id = task["data"]["sam3ray_image_id"]
        results = [r for p in task["predictions"] for r in p["result"]]
        mine = [r for r in results if not r.get("parentID")]
        regions, tops, most = regions + len(results), tops + len(mine), max(most, len(results))
        got = Counter((r["value"][key][0], round(r["score"], 6)) for r in mine)
        want = Counter((names[d["class_id"]], round(float(d["score"]), 6))
                       for d in by_image.get(image_id, []))  # fmt: skip
        mismatched += got != want
        if fmt == "rle":
            truth = {(names[d["class_id"]], round(float(d["score"]), 6)): d
                     for d in by_image.get(image_id, [])}  # fmt: skip
            for r in mine:
                d = truth[(r["value"][key][0], round(r["score"], 6))]
                mask = brush_rle_to_mask(r["value"]["rle"], r["original_height"],
                                         r["original_width"])  # fmt: skip
                masks_exact += bool(np.array_equal(mask, decode_rle(d["mask_rle"],
                                                                    d["mask_size"])))  # fmt: skip
        page = ls.session.get(ls.url + task["data"]["image"], timeout=60)
        images_ok += page.status_code == 200 and page.content == Path(images[image_id]).read_bytes()
    result = {
        "export_s": round(export_s, 2),
        "file_mb": round((work / f"{fmt}.json").stat().st_size / 2**20, 1),
        "import_s": round(import_s, 2),
        "tasks": len(stored),
        "ok_images": len(images),
        "predictions": sum(len(t["predictions"]) for t in stored),
        "regions": regions,
        "detections_as_regions": tops,
        "parquet_rows": len(rows),
        "tasks_with_other_labels_or_scores": mismatched,
        "regions_in_largest_task": most,
        "images_loaded_through_label_studio": images_ok,
    }
    if fmt == "rle":
        result["brush_masks_pixel_exact"] = masks_exact
    else:
        result["loss"] = done.loss.describe()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", help="a local job output (its images local too)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/labelstudio-app.json"))
    args = p.parse_args(argv)

    import os

    from tests.support.labelstudio import label_studio_executable, running_label_studio

    exe = label_studio_executable()
    if exe is None:
        print("label-studio not found: see tests/support/labelstudio.py", file=sys.stderr)
        return 2
    output = str(Path(args.output).resolve())
    rows, images = parquet_rows(output)
    folder = Path(os.path.commonpath([str(Path(u).parent) for u in images.values()]))
    work = Path(tempfile.mkdtemp(prefix="sam3ray-ls-app-"))
    result: dict[str, Any] = {"benchmark": "labelstudio_app", "output": output}
    with running_label_studio(exe, work, document_root=folder.parent) as ls:
        result["label_studio"] = ls.api("GET", "/api/version").get("release")
        result["startup_s"] = round(ls.startup_s, 1)
        for fmt in ("rle", "polygon"):
            result[fmt] = check_format(ls, output, fmt, folder.parent, work, rows, images)
            print(json.dumps({fmt: result[fmt]}), flush=True)
    checks = [result[f]["tasks"] == result[f]["ok_images"] for f in ("rle", "polygon")]
    checks += [result[f]["detections_as_regions"] == result[f]["parquet_rows"]
               for f in ("rle", "polygon")]  # fmt: skip
    checks += [result[f]["images_loaded_through_label_studio"] == result[f]["tasks"]
               for f in ("rle", "polygon")]  # fmt: skip
    checks += [result[f]["tasks_with_other_labels_or_scores"] == 0 for f in ("rle", "polygon")]
    checks.append(result["rle"]["brush_masks_pixel_exact"] == result["rle"]["parquet_rows"])
    result["pass"] = all(checks)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"pass: {result['pass']} -> {args.out}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
