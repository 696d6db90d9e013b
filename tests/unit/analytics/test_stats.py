"""Stats: exact numbers on a small output, and a 1,000,000-row output computed with a
driver peak memory far below the dataset's in-memory size (measured in a subprocess).

The million rows (20 files in the writer's layout, small fake RLE bytes) are generated
with vectorised pyarrow in ~3 s; the whole test takes ~8 s on 2 cores, so it is not
marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_scan import CIRCLE, RING, SQUARE, UNUSED, build_output

from sam3ray.analytics.stats import compute_stats, format_table
from sam3ray.output.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA

N_ROWS, N_CONCEPTS, N_SHARDS = 1_000_000, 5, 4  # 20 detection files of 50,000 rows
IMAGES_PER_SHARD = 25_000
BIG_CONCEPTS = [str(uuid.UUID(int=0xABC0 + k, version=4)) for k in range(N_CONCEPTS)]
RUNS = ["20260301T000000Z-run001", "20260302T000000Z-run002"]
REASONS = np.array(["not_an_image", "truncated", "not_found"])


def test_small_output_stats(tmp_path, capsys):
    syn = build_output(str(tmp_path / "out"), {}, str(tmp_path / "images"))
    stats = compute_stats(syn.loc, write=True)
    rows = {r["class_id"]: r for r in stats.concepts.to_pylist()}
    assert [r["category_id"] for r in stats.concepts.to_pylist()] == [1, 2, 3, 4]
    for cid in (CIRCLE, SQUARE, RING):
        dets = pd.DataFrame(syn.masks(cid))
        row = rows[cid]
        assert row["detections"] == len(dets)
        assert row["images"] == dets["image_id"].nunique()
        assert row["score_mean"] == pytest.approx(dets["score"].astype("float32").mean(), 1e-6)
        for q in (10, 50, 90):
            expected = dets["score"].astype("float32").quantile(q / 100)
            assert row[f"score_p{q}"] == pytest.approx(expected, abs=1e-6)
        assert row["mask_area_mean"] == pytest.approx(dets["area"].mean())
    assert rows[UNUSED]["detections"] == 0 and rows[UNUSED]["score_mean"] is None
    runs = {r["run_id"]: r for r in stats.runs.to_pylist()}
    first, second = sorted(runs)
    assert (runs[first]["inputs"], runs[first]["ok"], runs[first]["errors"]) == (5, 4, 1)
    assert runs[first]["errors_by_reason"] == [("not_an_image", 1)]
    assert (runs[second]["inputs"], runs[second]["errors"]) == (4, 0)
    assert runs[second]["status"] == "succeeded" and runs[second]["images_per_s"] == 2.5
    assert sum(r["detections"] for r in runs.values()) == len(syn.detections)
    on_disk = pq.read_table(stats.concepts_uri)
    assert on_disk.equals(stats.concepts)
    assert pq.read_table(stats.runs_uri).equals(stats.runs)
    assert "circle" in format_table(stats.concepts)
    approx = {r["class_id"]: r for r in compute_stats(syn.loc, approx=True).concepts.to_pylist()}
    for cid in (CIRCLE, SQUARE, RING):  # t-digest / HyperLogLog: close, in constant memory
        assert approx[cid]["detections"] == rows[cid]["detections"]
        assert abs(approx[cid]["images"] - rows[cid]["images"]) <= 1
        assert approx[cid]["score_p50"] == pytest.approx(rows[cid]["score_p50"], abs=0.1)

    from sam3ray.cli import main

    shutil.rmtree(tmp_path / "out" / "stats")
    assert main(["stats", syn.output]) == 0
    printed = capsys.readouterr().out
    assert "not_an_image=1" in printed and "concepts.parquet" not in printed
    assert not (tmp_path / "out" / "stats").exists()  # read-only unless asked
    assert main(["stats", syn.output, "--save"]) == 0
    assert "concepts.parquet" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "out" / "stats" / "concepts.parquet").equals(stats.concepts)
    assert main(["stats", str(tmp_path / "nothing-here")]) == 2
    assert not (tmp_path / "nothing-here").exists()


def _const(value, n: int, type_=pa.string()) -> pa.Array:
    return pa.array([value], type_).take(np.zeros(n, dtype=np.int64))


def _write_big_output(root: Path) -> tuple[int, dict]:
    """1M detection rows in the writer's layout; returns (in-memory bytes, expected run counts)."""
    rng = np.random.default_rng(11)
    rows_per_file = N_ROWS // (N_CONCEPTS * N_SHARDS)
    nbytes = 0
    runs: dict[str, dict] = {}
    now = pa.array(np.full(1, np.datetime64("2026-03-01T00:00:00", "us"))).cast(
        DETECTIONS_SCHEMA.field("created_at").type
    )
    for s in range(N_SHARDS):
        run_id, shard = RUNS[s % 2], f"s{s:04d}"
        image_ids = pa.array([f"{s:02d}{i:014x}" for i in range(IMAGES_PER_SHARD)])
        uris = pa.array([f"s3://lake/photos/{s:02d}/{i:07d}.jpg" for i in range(IMAGES_PER_SHARD)])
        status = np.where(rng.random(IMAGES_PER_SHARD) < 0.02, "error", "ok")
        reasons = np.where(status == "error", REASONS[rng.integers(0, 3, IMAGES_PER_SHARD)], None)
        images = pa.table({
            "run_id": _const(run_id, IMAGES_PER_SHARD), "image_id": image_ids, "uri": uris,
            "shard_id": _const(shard, IMAGES_PER_SHARD), "status": pa.array(status),
            "error_reason": pa.array(reasons, pa.string()),
            "n_detections": pa.array(np.zeros(IMAGES_PER_SHARD, np.int32)),
            "created_at": now.take(np.zeros(IMAGES_PER_SHARD, np.int64)),
        })  # fmt: skip
        images = images.select([f.name for f in IMAGES_SCHEMA if f.name in images.column_names])
        (root / "images").mkdir(parents=True, exist_ok=True)
        pq.write_table(images, root / "images" / f"part-{shard}.parquet")
        counts = runs.setdefault(run_id, {"inputs": 0, "errors": {}})
        counts["inputs"] += IMAGES_PER_SHARD
        for reason, n in zip(*np.unique(reasons[status == "error"], return_counts=True)):
            counts["errors"][reason] = counts["errors"].get(reason, 0) + int(n)
        ok = np.flatnonzero(status == "ok")
        for k, class_id in enumerate(BIG_CONCEPTS):
            n = rows_per_file
            idx = np.sort(ok[rng.integers(0, ok.size, n)])
            lengths = rng.integers(16, 64, n)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            masks = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                          pa.py_buffer(rng.bytes(int(offsets[-1])))])  # fmt: skip
            boxes = rng.uniform(0, 500, (n, 4)).astype(np.float32)
            table = pa.table({
                "run_id": _const(run_id, n), "image_id": image_ids.take(idx),
                "uri": uris.take(idx), "frame_index": pa.nulls(n, pa.int32()),
                "timestamp_s": pa.nulls(n, pa.float64()), "track_id": pa.nulls(n, pa.int64()),
                "concept": _const(f"concept-{k}", n), "query": _const(f'text:"thing {k}"', n),
                "score": pa.array(rng.beta(2 + k, 2, n).astype(np.float32)),
                "box": pa.FixedSizeListArray.from_arrays(pa.array(boxes.ravel()), 4),
                "mask_rle": masks,
                "mask_size": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.tile(np.array([480, 640], np.int32), n)), 2),
                "area": pa.array(rng.integers(10, 300_000, n)),
                "width": _const(640, n, pa.int32()), "height": _const(480, n, pa.int32()),
                "model": _const("sam3.pt@0123456789ab", n),
                "created_at": now.take(np.zeros(n, int)),
            })  # fmt: skip
            nbytes += table.nbytes
            directory = root / "detections" / f"class_id={class_id}"
            directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, directory / f"part-{shard}.parquet", compression="zstd")
    return nbytes, runs


_MEASURE = textwrap.dedent("""
    import json, sys, time
    import duckdb, pyarrow.dataset  # imported before the baseline: not the data's memory
    from sam3ray.analytics.stats import compute_stats
    from sam3ray.storage.location import Location

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    start = status("VmRSS:")
    compute_stats(Location(sys.argv[2]))  # warm-up on a tiny output: one-off library set-up costs
    warm = status("VmHWM:")
    base = status("VmRSS:")
    t = time.perf_counter()
    stats = compute_stats(Location(sys.argv[1]))
    print(json.dumps({"start": start, "warm": warm, "base": base, "peak": status("VmHWM:"),
                      "seconds": time.perf_counter() - t,
                      "concepts": stats.concepts.to_pylist(), "runs": stats.runs.to_pylist()}))
""")


def test_million_rows_streaming_and_correct(tmp_path):
    t0 = time.perf_counter()
    out = tmp_path / "big"
    nbytes, expected_runs = _write_big_output(out)
    generated = time.perf_counter() - t0
    small = build_output(str(tmp_path / "small"), {}, str(tmp_path / "images")).output
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(out), small], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {r["class_id"]: r for r in result["concepts"]}
    assert sum(r["detections"] for r in rows.values()) == N_ROWS

    # every number of one concept against pandas on that concept's partition
    cid = BIG_CONCEPTS[2]
    df = pd.read_parquet(out / "detections" / f"class_id={cid}",
                         columns=["image_id", "score", "area"])  # fmt: skip
    row = rows[cid]
    assert row["detections"] == len(df) == N_ROWS // N_CONCEPTS
    assert row["images"] == df["image_id"].nunique()
    assert row["score_mean"] == pytest.approx(df["score"].astype("float64").mean(), rel=1e-9)
    for q in (10, 50, 90):
        expected = np.quantile(df["score"].to_numpy(np.float64), q / 100)
        assert row[f"score_p{q}"] == pytest.approx(expected, abs=1e-6)
    assert row["mask_area_mean"] == pytest.approx(df["area"].mean(), rel=1e-9)
    for run in result["runs"]:
        want = expected_runs[run["run_id"]]
        assert run["inputs"] == want["inputs"]
        assert dict(run["errors_by_reason"]) == want["errors"]
        assert run["ok"] + run["errors"] == want["inputs"]

    # peak RSS over the resident size before the run; the warm-up on a tiny output took
    # the one-off costs (DuckDB and Arrow set-up, thread pools) that do not grow with data
    delta = result["peak"] - result["base"]
    setup = result["warm"] - result["start"]
    print(
        f"\n1M rows: generated in {generated:.1f}s, stats in {result['seconds']:.1f}s; "
        f"dataset {nbytes / 2**20:.0f} MiB in memory; driver peak RSS delta "
        f"{delta / 2**20:.0f} MiB (one-off set-up before it: {setup / 2**20:.0f} MiB)"
    )
    assert nbytes > 200 * 2**20  # the reference really is large
    assert delta < nbytes / 4, (delta, nbytes)
    assert delta + setup < nbytes / 2, (delta, setup, nbytes)
