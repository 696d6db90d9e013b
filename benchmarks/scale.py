"""Planning at lake scale: today's planner vs the one before it, side by side, no inference.

Three measurements, each in fresh subprocesses so a driver's peak RSS is its own:

1. ``plan``: from a Parquet manifest of N fake ``s3://`` URIs (nothing is read), the
   first plan of an empty output (written, as a run would), then a no-op resume
   (every input labelled) — wall time, driver peak RSS, inputs/s — at each N; the
   previous planner (``sam3ray.planning.plan_job`` at ``--old-ref``, checked out into
   a temporary git worktree) plans the same manifest where it still fits. Between
   the two new plans the run is consolidated from commit keys written for every
   planned task (this benchmark's stand-in for labelling: no model, no data files).
2. ``scan``: committed-state reads against a moto S3 server on 127.0.0.1: listing
   ``--scan-n`` commit keys (what crash recovery reads) and reading the consolidated
   shards table; the previous design's one GET per marker at ``--old-scan-n``.
3. ``amplification``: inputs labelled ÷ inputs new on a 20,000-input output for +1%
   hash-named inputs, +1% date-prefixed inputs and +1 concept (concept-inputs
   labelled ÷ concept-inputs new), for both planners.

Usage: ``python benchmarks/scale.py [--sizes 100000 1000000 10000000] [--out ...]``.
Writes ``benchmarks/results/scale-cpu.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procmem import peak_rss_mb  # benchmarks/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, 12)]


def _uris(n: int, start: int = 0, dated: bool = False) -> list[str]:
    if dated:
        return [f"s3://lake/images/2026/12/{i:09d}.jpg" for i in range(start, start + n)]
    return [
        f"s3://lake/images/{hashlib.md5(str(i).encode()).hexdigest()}.jpg"
        for i in range(start, start + n)
    ]


def _write_manifest(path: Path, uris: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": uris}), path, row_group_size=250_000)


def _concepts(path: Path, n: int) -> str:
    rows = ["class_id,name,text"] + [f"{c},c{i},thing {i}" for i, c in enumerate(CONCEPTS[:n])]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _config(work: Path, manifest: Path, concepts: str, engine: str, shard_size: int = 256):
    from sam3ray.config import JobConfig

    ckpt = work / "ckpt.pt"
    ckpt.write_bytes(b"never loaded: planning only")
    return JobConfig.model_validate(
        {
            "input": {"manifest": str(manifest), "storage_options": {"anon": True}},
            "prompts": {"concepts": concepts},
            "model": {"checkpoint": str(ckpt), "device": "cpu"},
            "resources": {"gpus_per_actor": 0},
            "output": {"uri": str(work / "out"), "shard_size": shard_size},
            "plan": {"engine": engine},
        }
    )


def _fake_commits(cfg, run_id: str) -> int:
    """A commit key for every task of the run's plan: labelling without a model (one plan
    file at a time, so the driver's peak stays the planner's, not this stand-in's)."""
    from sam3ray.output.state import commit_key, plan_files, read_plan_file

    out = cfg.output_location
    n = 0
    for loc in plan_files(out, run_id):
        part = read_plan_file(loc, ["shard_id", "kind"])
        for sid, kind in zip(part.column("shard_id").to_pylist(), part.column("kind").to_pylist()):
            if kind in ("image", "video"):
                out.child(commit_key(run_id, sid)).write_bytes(b"{}")
                n += 1
    return n


# -- child processes ------------------------------------------------------------------------


def child_new(args: argparse.Namespace) -> dict:
    """One plan (and, for the first, its consolidation) with the current planner."""
    import ray

    from sam3ray.plan.job import prepare
    from sam3ray.runner.job import consolidate, make_plan

    work = Path(args.work)
    cfg = _config(work, Path(args.manifest), args.concepts, args.engine, args.shard_size)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    plan = make_plan(cfg, prepared)
    plan_s = time.perf_counter() - t0
    out = {"plan_s": round(plan_s, 2), "engine": plan.engine, "stats": plan.stats.to_json()}
    out["peak_rss_mb_after_plan"] = peak_rss_mb()
    if args.consolidate and plan.stats.tasks:
        t1 = time.perf_counter()
        out["commit_keys"] = _fake_commits(cfg, plan.run_id)
        t2 = time.perf_counter()
        out["consolidation"] = consolidate(cfg, plan.run_id)
        out["commit_keys_s"] = round(t2 - t1, 2)
        out["consolidate_s"] = round(time.perf_counter() - t2, 2)
    out["peak_rss_mb"] = peak_rss_mb()
    ray.shutdown()
    return out


def child_old(args: argparse.Namespace) -> dict:
    """One plan with the previous planner (runs from its own checkout)."""
    from sam3ray.planning import plan_job

    from sam3ray.config import JobConfig

    work = Path(args.work)
    ckpt = work / "ckpt.pt"
    ckpt.write_bytes(b"x")
    cfg = JobConfig.model_validate(
        {
            "input": {"manifest": args.manifest, "storage_options": {"anon": True}},
            "prompts": {"concepts": args.concepts},
            "model": {"checkpoint": str(ckpt), "device": "cpu"},
            "output": {"uri": str(work / "old-out"), "shard_size": args.shard_size},
        }
    )
    t0 = time.perf_counter()
    plan = plan_job(cfg)
    return {
        "plan_s": round(time.perf_counter() - t0, 2),
        "todo_shards": len(plan.todo),
        "todo_inputs": sum(len(s) for s in plan.todo),
        "peak_rss_mb": peak_rss_mb(),
    }


def _run_child(mode: str, argv: list[str], pythonpath: str | None = None, timeout=3600) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.setdefault("RAY_DEDUP_LOGS", "0")
    cmd = [sys.executable, __file__, "--child", mode, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the measurements -----------------------------------------------------------------------


def old_checkout(ref: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="sam3ray-old-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(where / "src"), ref],
        check=True,
        capture_output=True,
    )
    return where / "src"


def bench_plan(sizes: list[int], old_src: Path | None, old_max: int, work_root: Path) -> list:
    rows = []
    for n in sizes:
        work = work_root / f"plan-{n}"
        work.mkdir(parents=True)
        manifest = work / "manifest.parquet"
        _write_manifest(manifest, _uris(n))
        concepts = _concepts(work / "concepts.csv", 10)
        common = ["--work", str(work), "--manifest", str(manifest), "--concepts", concepts]
        first = _run_child("new", [*common, "--engine", "ray", "--consolidate"])
        noop = _run_child("new", [*common, "--engine", "ray"])
        row = {
            "inputs": n,
            "first_plan": first,
            "noop_resume": noop,
            "noop_inputs_per_s": round(n / noop["plan_s"], 1),
        }
        if old_src is not None and n <= old_max:
            row["old_plan"] = _run_child(
                "old", common, pythonpath=str(old_src), timeout=max(600, n // 1000)
            )
        print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
        rows.append(row)
        shutil.rmtree(work, ignore_errors=True)
    return rows


class _MotoProcess:
    """moto's S3 server in its own process on 127.0.0.1: in this process its Python
    request handling would share the GIL with the client threads being measured."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        exe = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _moto():
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = _MotoProcess()
    opts = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {
            "endpoint_url": f"http://127.0.0.1:{server.port}",
            "region_name": "us-east-1",
        },
    }
    return server, opts


def _boto3(opts: dict):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=opts["client_kwargs"]["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def _put_many(opts: dict, bucket: str, items: list[tuple[str, bytes]]) -> float:
    from concurrent.futures import ThreadPoolExecutor

    client = _boto3(opts)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), items))
    return time.perf_counter() - t0


def scan(n: int, old_n: int, old_src: Path | None) -> dict:
    """Committed state against a real S3 API (moto on 127.0.0.1)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from sam3ray.output.state import (
        N_BUCKETS,
        SHARDS_DIR,
        SHARDS_SCHEMA,
        bucket_of,
        commit_key,
        commits_dir,
        committed,
        current_shards,
        write_bucket,
    )
    from sam3ray.storage.location import Location

    server, opts = _moto()
    try:
        client = _boto3(opts)
        client.create_bucket(Bucket="state")
        out = Location("s3://state/labels", opts)
        run = "20261201T000000Z-bench0"
        ids = ["s" + hashlib.sha1(str(i).encode()).hexdigest()[:16] for i in range(n)]
        put_s = _put_many(opts, "state", [(f"labels/{commit_key(run, s)}", b"{}") for s in ids])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            found = sum(
                len(c) for c in pool.map(lambda b: committed(out, run, b), range(N_BUCKETS))
            )
        list_s = time.perf_counter() - t0
        assert found == n, (found, n)
        by_bucket: dict[int, list[dict]] = {}
        for sid in ids:
            by_bucket.setdefault(bucket_of(sid), []).append(
                {
                    "shard_id": sid,
                    "kind": "image",
                    "uris": [f"s3://lake/{sid}.jpg"],
                    "image_ids": [sid[1:]],
                    "span": None,
                    "prints": "{}",
                    "run_id": run,
                    "errors": False,
                }  # fmt: skip
            )
        for b, rows in by_bucket.items():
            write_bucket(out, SHARDS_DIR, b, run, pa.Table.from_pylist(rows, SHARDS_SCHEMA))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            read = sum(
                t.num_rows for t in pool.map(lambda b: current_shards(out, b), range(N_BUCKETS))
            )
        table_s = time.perf_counter() - t0
        # The server's own floor for the same work, without sam3ray: boto3 listing the
        # same keys (one paginated stream per bucket prefix, same threads) and GETting
        # the same shards files.
        t0 = time.perf_counter()

        def raw_list(b: int) -> int:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket="state", Prefix=f"labels/{commits_dir(run)}/{b:02x}/"
            )
            return sum(len(p.get("Contents", [])) for p in pages)

        with ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(raw_list, range(N_BUCKETS))) == n
        raw_list_s = time.perf_counter() - t0
        keys = [
            o["Key"]
            for p in client.get_paginator("list_objects_v2").paginate(
                Bucket="state", Prefix=f"labels/{SHARDS_DIR}/"
            )
            for o in p.get("Contents", [])
        ]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: client.get_object(Bucket="state", Key=k)["Body"].read(), keys))
        raw_get_s = time.perf_counter() - t0
        assert read == n
        result = {
            "markers": n,
            "upload_s": round(put_s, 1),
            "commit_keys_listed_s": round(list_s, 2),
            "commit_keys_per_s": round(n / list_s),
            "shards_table_read_s": round(table_s, 2),
            "shards_rows_per_s": round(n / table_s),
            "server_floor": {
                "boto3_list_same_keys_s": round(raw_list_s, 2),
                "boto3_get_same_shards_files_s": round(raw_get_s, 2),
                "files": len(keys),
            },
        }
        if old_src is not None and old_n:
            markers = []
            for sid in ids[:old_n]:
                m = {"shard_id": sid, "members_hash": "x", "n_inputs": 1, "n_ok": 1,
                     "n_error": 0, "n_detections": 0, "run_id": run, "files": [],
                     "written_at": "2026-12-01T00:00:00", "settings_hash": "y"}  # fmt: skip
                markers.append((f"old/_markers/{sid}.json", json.dumps(m).encode()))
            _put_many(opts, "state", markers)
            code = (
                "import json, sys, time; from sam3ray.output import scan_markers; "
                "t=time.perf_counter(); m=scan_markers(sys.argv[1], json.loads(sys.argv[2])); "
                "print(json.dumps({'n': len(m), 's': time.perf_counter()-t}))"
            )
            env = dict(os.environ, PYTHONPATH=str(old_src))
            proc = subprocess.run(
                [sys.executable, "-c", code, "s3://state/old", json.dumps(opts)],
                capture_output=True, text=True, env=env, timeout=3600, check=True, cwd=old_src,
            )  # fmt: skip
            old = json.loads(proc.stdout.strip().splitlines()[-1])
            result["old_scan_markers"] = {
                "markers": old["n"],
                "s": round(old["s"], 2),
                "markers_per_s": round(old["n"] / old["s"], 1),
                "extrapolated_s_at_scan_n": round(n / (old["n"] / old["s"]), 1),
            }
        print(json.dumps(result), flush=True)
        return result
    finally:
        server.stop()


def child_amp_new(args: argparse.Namespace) -> dict:
    """Amplification with the current planner: base output, then three changes."""
    from sam3ray.plan.job import prepare
    from sam3ray.runner.job import consolidate, make_plan

    work = Path(args.work)
    out: dict = {}
    for case in ("hash", "dated", "concept"):
        w = work / f"new-{case}"
        w.mkdir(parents=True)
        base = _uris(20_000, dated=case == "dated")
        _write_manifest(w / "m.parquet", base)
        concepts10 = _concepts(w / "c10.csv", 10)
        cfg = _config(w, w / "m.parquet", concepts10, "local")
        plan = make_plan(cfg, prepare(cfg))
        _fake_commits(cfg, plan.run_id)
        consolidate(cfg, plan.run_id)
        if case == "concept":
            cfg = _config(w, w / "m.parquet", _concepts(w / "c11.csv", 11), "local")
            stats = make_plan(cfg, prepare(cfg), write=False).stats
            labelled = sum(sum(k.values()) for k in stats.by_concept.values())
            out[case] = {"new": 20_000, "labelled": labelled, "amplification": labelled / 20_000}
        else:
            new = _uris(200, start=20_000, dated=case == "dated")
            _write_manifest(w / "m.parquet", base + new)
            stats = make_plan(cfg, prepare(cfg), write=False).stats
            labelled = stats.fresh_inputs + stats.relabel_inputs
            out[case] = {"new": 200, "labelled": labelled, "amplification": labelled / 200}
    return out


def child_amp_old(args: argparse.Namespace) -> dict:
    """Amplification with the previous planner (content-defined shards, one fingerprint)."""
    from sam3ray.planning import plan_job

    from sam3ray.config import JobConfig

    work = Path(args.work)
    ckpt = work / "ckpt.pt"
    ckpt.write_bytes(b"x")
    out: dict = {}
    for case in ("hash", "dated", "concept"):
        w = work / f"old-{case}"
        w.mkdir(parents=True)
        base = _uris(20_000, dated=case == "dated")
        _write_manifest(w / "m.parquet", base)

        def cfg(concepts: str, w=w) -> JobConfig:
            return JobConfig.model_validate(
                {
                    "input": {"manifest": str(w / "m.parquet"), "storage_options": {"anon": True}},
                    "prompts": {"concepts": concepts},
                    "model": {"checkpoint": str(ckpt), "device": "cpu"},
                    "output": {"uri": str(w / "out"), "shard_size": 256},
                }
            )

        c10 = _concepts(w / "c10.csv", 10)
        first = plan_job(cfg(c10))
        markers = w / "out" / "_markers"
        markers.mkdir(parents=True)
        for s in first.todo:  # the previous design's commit: one marker per shard
            m = {"shard_id": s.shard_id, "members_hash": s.members_hash, "n_inputs": len(s),
                 "n_ok": len(s), "n_error": 0, "n_detections": 0, "run_id": "base",
                 "files": [], "written_at": "2026-12-01T00:00:00",
                 "settings_hash": s.settings_hash}  # fmt: skip
            (markers / f"{s.shard_id}.json").write_text(json.dumps(m))
        if case == "concept":
            plan = plan_job(cfg(_concepts(w / "c11.csv", 11)))
            labelled = sum(len(s) for s in plan.todo) * 11
            out[case] = {"new": 20_000, "labelled": labelled, "amplification": labelled / 20_000}
        else:
            new = _uris(200, start=20_000, dated=case == "dated")
            _write_manifest(w / "m.parquet", base + new)
            plan = plan_job(cfg(c10))
            labelled = sum(len(s) for s in plan.todo)
            out[case] = {"new": 200, "labelled": labelled, "amplification": labelled / 200}
    return out


def amplification(work_root: Path, old_src: Path | None) -> dict:
    work = work_root / "amp"
    work.mkdir(parents=True, exist_ok=True)
    result = {"output_inputs": 20_000, "shard_size": 256, "concepts": 10}
    result["new"] = _run_child("amp-new", ["--work", str(work)])
    if old_src is not None:
        result["old"] = _run_child("amp-old", ["--work", str(work)], pythonpath=str(old_src))
    print(json.dumps(result), flush=True)
    return result


PARTS = ("plan", "scan", "amplification")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--old-ref", default="8b6f882", help="the previous planner's git ref")
    p.add_argument("--old-max", type=int, default=1_000_000, help="largest N for the old one")
    p.add_argument("--scan-n", type=int, default=100_000)
    p.add_argument("--old-scan-n", type=int, default=5_000)
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale-cpu.json"))
    # child-process arguments
    p.add_argument("--child")
    p.add_argument("--work")
    p.add_argument("--manifest")
    p.add_argument("--concepts")
    p.add_argument("--engine", default="ray")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--consolidate", action="store_true")
    args = p.parse_args()
    if args.child:
        modes = {"new": child_new, "old": child_old, "amp-new": child_amp_new}
        fn = {**modes, "amp-old": child_amp_old}[args.child]
        print(json.dumps(fn(args), default=str))
        return 0

    work_root = Path(tempfile.mkdtemp(prefix="sam3ray-scale-"))
    old_src = old_checkout(args.old_ref)
    result: dict = {
        "benchmark": "planning at lake scale (no inference), current vs previous planner",
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_start": os.getloadavg(),
        "old_ref": args.old_ref,
    }
    try:
        if "plan" not in args.skip:
            result["plan"] = bench_plan(args.sizes, old_src, args.old_max, work_root)
        if "scan" not in args.skip:
            result["scan"] = scan(args.scan_n, args.old_scan_n, old_src)
        if "amplification" not in args.skip:
            result["amplification"] = amplification(work_root, old_src)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_src)])
        shutil.rmtree(work_root, ignore_errors=True)
    result["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    if args.skip and out.exists():  # a partial rerun replaces only the parts it measured
        previous = json.loads(out.read_text())
        result = {**previous, **result, "parts_rerun": sorted(set(PARTS) - set(args.skip))}
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
