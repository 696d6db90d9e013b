"""The image job end to end on a real local Ray, local files in and out.

One job over 16 generated images (JPEG and PNG, <= 320 px, two folders) runs
once per module; the tests check what it wrote with generic readers and
against the engine run directly. Resume, validation before Ray, the CLI's exit
codes and geometric prompts have their own small jobs. Helpers and constants
come from tests/integration/conftest.py through the ``it`` fixture.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from sam3ray.cli import main as cli_main
from sam3ray.cli.report import summary_text
from sam3ray.config import ConfigError, JobConfig
from sam3ray.core.types import Exemplar
from sam3ray.runner.job import run_job

pytestmark = pytest.mark.integration

N_IMAGES = 16


@pytest.fixture(scope="module")
def local_job(it, ray_session, tiny_checkpoint, concepts_csv, tmp_path_factory):
    """16 images, shard_size 3 (a shard holds at most 6, so >= 3 shards), one run."""
    root = tmp_path_factory.mktemp("local-job")
    uris = it.write_images(root / "images", N_IMAGES)
    out = str(root / "labels")
    cfg = it.job_config(
        uris=[str(root / "images")], concepts=concepts_csv, checkpoint=tiny_checkpoint, output=out
    )
    summary = run_job(cfg)
    print("local job timing", summary["timing_s"], summary["actors"], summary["shards"])
    return {"cfg": cfg, "uris": uris, "out": out, "summary": summary}


def test_images_table_invariant_and_summary(it, local_job):
    s, uris = local_job["summary"], local_job["uris"]
    images, detections = it.read_output(local_job["out"])

    it.check_images_invariant(images, detections, uris)
    assert set(images.column("status").to_pylist()) == {"ok"}
    assert set(images.column("run_id").to_pylist()) == {s["run_id"]}
    assert s["status"] == "succeeded"
    assert (s["inputs_total"], s["inputs_processed"], s["ok"], s["errors"]) == (16, 16, 16, 0)
    assert s["detections"] == detections.num_rows > 0
    per_concept = detections.group_by("concept").aggregate([("score", "count")]).to_pylist()
    assert s["detections_by_concept"] == {r["concept"]: r["score_count"] for r in per_concept}
    on_disk = json.loads(Path(local_job["out"], "runs", f"{s['run_id']}.json").read_text())
    assert on_disk["detections"] == s["detections"] and on_disk["status"] == "succeeded"
    # The tables report images (and their masks, see check_images_invariant) in original pixels.
    assert {(r["width"], r["height"]) for r in images.to_pylist()} >= {(320, 240), (320, 320)}


def test_model_loaded_once_per_actor(local_job):
    s = local_job["summary"]
    loads = s["actors"]["model_loads_per_actor"]
    assert loads and all(n == 1 for n in loads), loads
    assert s["actors"]["count"] == len(loads) <= 2
    assert s["shards"]["done_now"] > s["actors"]["count"], "shards must outnumber actors"


def test_output_matches_engine_run_directly(it, local_job, direct_engine):
    _, detections = it.read_output(local_job["out"])
    want = it.engine_reference(direct_engine, local_job["uris"])
    it.assert_same_as_engine(it.scores_by_key(detections), want)


def test_output_readable_by_pyarrow_pandas_duckdb(it, local_job):
    out, s = local_job["out"], local_job["summary"]
    det_dir = f"{out}/detections"

    hive = ds.dataset(det_dir, format="parquet", partitioning="hive")
    table = hive.to_table()
    assert table.num_rows == s["detections"]
    assert set(table.column("class_id").to_pylist()) <= set(it.CLASS_IDS)
    cat_only = hive.to_table(filter=ds.field("class_id") == it.CAT)
    assert cat_only.num_rows > 0 and set(cat_only.column("concept").to_pylist()) == {"cat"}

    pdf = pd.read_parquet(det_dir)
    assert len(pdf) == s["detections"]
    pd_counts = pdf.groupby(pdf["class_id"].astype(str)).size().to_dict()

    rows = duckdb.sql(
        f"select class_id, concept, count(*) from read_parquet('{det_dir}/*/*.parquet', "
        "hive_partitioning=true) group by 1, 2"
    ).fetchall()
    assert {c: n for c, _, n in rows} == pd_counts
    assert {concept: n for _, concept, n in rows} == s["detections_by_concept"]
    images = duckdb.sql(
        "select count(*), count(distinct image_id), sum(n_detections) "
        f"from read_parquet('{out}/images/*.parquet')"
    ).fetchall()
    assert images == [(N_IMAGES, N_IMAGES, s["detections"])]

    # Partitions are class_id=<uuid>/ with at most one file per shard (few files).
    shards = s["shards"]["done_now"]
    for part in Path(det_dir).iterdir():
        assert part.name.startswith("class_id=") and part.name[len("class_id=") :] in it.CLASS_IDS
        files = [f for f in os.listdir(part) if f.endswith(".parquet")]
        assert 1 <= len(files) <= shards, (part.name, len(files), shards)
    assert len(os.listdir(f"{out}/images")) == shards


def _copy_job(local_job, tmp_path, **output_update):
    """The module's job on a copy of its output (the module's output stays as it was)."""
    out = str(tmp_path / "labels")
    shutil.copytree(local_job["out"], out)
    base = local_job["cfg"]
    update = {"uri": out, **output_update}
    return base.model_copy(update={"output": base.output.model_copy(update=update)}), out


def test_resume_with_nothing_new_does_nothing_and_starts_no_actor(it, local_job, tmp_path):
    cfg, out = _copy_job(local_job, tmp_path)
    before = it.detection_set(it.read_output(out)[1])
    t0 = time.perf_counter()
    again = run_job(cfg)
    wall = time.perf_counter() - t0
    assert again["inputs_processed"] == 0 and again["shards"]["done_now"] == 0
    assert again["inputs_skipped_done"] == N_IMAGES and again["plan"]["inputs"]["new"] == 0
    assert again["actors"]["count"] == 0, "no actor (no model load) when nothing is left"
    assert again["timing_s"]["ray_init"] == 0, "a nightly run over a labelled lake starts no Ray"
    assert wall < 10, f"a resume with nothing to do took {wall:.1f} s"
    assert it.detection_set(it.read_output(out)[1]) == before


def test_new_inputs_are_labelled_alone_in_new_shards(it, local_job, tmp_path, direct_engine):
    """Two new images (hash-like names, so they sort anywhere): the run labels exactly them,
    in a new shard; every committed shard's files stay byte for byte."""
    cfg, out = _copy_job(local_job, tmp_path)
    first = local_job["summary"]
    files = {p: p.read_bytes() for p in Path(out).rglob("*.parquet") if "_state" not in p.parts}
    added = []
    for seed, name in ((100, "3f9a.png"), (101, "a07c.jpg")):
        path = Path(cfg.input.uris[0]) / "new" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(it.image_bytes(seed, "PNG" if name.endswith("png") else "JPEG"))
        added.append(str(path.resolve()))
    try:
        again = run_job(cfg)
        assert again["inputs_processed"] == 2 and again["plan"]["inputs"]["new"] == 2
        assert again["shards"]["new"] == 1 and again["shards"]["relabelled"] == 0
        images, detections = it.read_output(out)
        it.check_images_invariant(images, detections, local_job["uris"] + added)
        runs = {r["uri"]: r["run_id"] for r in images.to_pylist()}
        assert {runs[u] for u in added} == {again["run_id"]}
        assert {runs[u] for u in local_job["uris"]} == {first["run_id"]}
        for path, data in files.items():
            assert path.read_bytes() == data, f"{path} was rewritten"
        want = it.engine_reference(direct_engine, added)
        got = {k: v for k, v in it.scores_by_key(detections).items() if k[0] in
               {r["image_id"] for r in images.to_pylist() if r["uri"] in added}}  # fmt: skip
        it.assert_same_as_engine(got, want)
    finally:  # the module's other tests list this folder
        shutil.rmtree(Path(cfg.input.uris[0]) / "new")


def test_changed_settings_relabel_per_concept_or_are_refused(it, local_job, tmp_path):
    """Raising inference.conf (a setting of every concept): refused when the config says so,
    else every concept of every shard is relabelled and the output equals the old one cut
    at the new threshold; an exemplar added for one image relabels one concept of one
    shard; a new concept is labelled alone."""
    first = local_job["summary"]
    cfg0, out = _copy_job(local_job, tmp_path)
    before = it.read_output(out)[1].select(["image_id", "class_id", "score"]).to_pylist()
    n_shards = first["shards"]["done_now"]

    def variant(on_change="redo", geometric=None, concepts=None, conf=0.6) -> JobConfig:
        return cfg0.model_copy(
            update={
                "output": cfg0.output.model_copy(update={"on_settings_change": on_change}),
                "inference": cfg0.inference.model_copy(update={"conf": conf}),
                "prompts": cfg0.prompts.model_copy(
                    update={"geometric": geometric, "concepts": concepts or cfg0.prompts.concepts}
                ),
            }
        )

    with pytest.raises(ConfigError) as refused:
        run_job(variant("refuse"))
    message = str(refused.value)
    assert "output.on_settings_change" in message and first["run_id"] in message
    assert len(list(Path(out, "runs").glob("*.json"))) == 1, "refused before any work"

    redo = run_job(variant())
    assert redo["shards"]["relabelled"] == redo["shards"]["done_now"] == n_shards
    assert (redo["inputs_processed"], redo["shards"]["new"]) == (N_IMAGES, 0)
    assert redo["labelling_settings"]["image"]["inference.conf"] == 0.6
    assert f"relabelled {n_shards} shards" in summary_text(redo)
    images, detections = it.read_output(out)
    it.check_images_invariant(images, detections, local_job["uris"])
    assert set(images.column("run_id").to_pylist()) == {redo["run_id"]}
    # Raising the threshold keeps exactly the old detections above it (rocket has its
    # own min_score 0.5): greedy NMS over a score prefix is a prefix of the NMS result.
    kept = [d for d in before if str(d["class_id"]) == it.ROCKET or d["score"] >= 0.6]
    assert 0 < len(kept) < len(before)
    assert it.detection_set(detections) == it.detection_set(pa.Table.from_pylist(kept))

    again = run_job(variant())
    assert again["inputs_processed"] == 0 and again["shards"]["relabelled"] == 0

    target = local_job["uris"][0]
    geometric = tmp_path / "geometric.csv"
    geometric.write_text(
        f"image_uri,class_id,kind,x0,y0,x1,y1,positive\n{target},{it.CAT},box,20,30,120,140,true\n"
    )
    one = run_job(variant(geometric=str(geometric)))
    assert one["shards"]["relabelled"] == one["shards"]["done_now"] == 1
    assert one["plan"]["by_concept"] == {it.CAT: {"edited": one["inputs_processed"]}}
    assert set(one["detections_by_concept"]) <= {"cat"}

    dog = "7d1e0a11-2b3c-4d5e-8f90-a1b2c3d4e5f6"
    more = tmp_path / "concepts-plus.csv"
    more.write_text(Path(cfg0.prompts.concepts).read_text() + f"{dog},dog,dog,\n")
    plus = run_job(variant(geometric=str(geometric), concepts=str(more)))
    assert plus["shards"]["relabelled"] == n_shards and plus["inputs_processed"] == N_IMAGES
    assert set(plus["plan"]["by_concept"]) == {dog}, "only the new concept runs"
    assert set(plus["detections_by_concept"]) <= {"dog"}
    images, detections = it.read_output(out)
    it.check_images_invariant(images, detections, local_job["uris"])


def test_changing_shard_size_relabels_nothing(it, local_job, tmp_path):
    """Committed shards are never re-cut: a new shard_size applies to new inputs only."""
    cfg, out = _copy_job(local_job, tmp_path, shard_size=1000)
    summary = run_job(cfg)
    assert summary["inputs_processed"] == 0 and summary["shards"]["done_now"] == 0
    images, detections = it.read_output(out)
    it.check_images_invariant(images, detections, local_job["uris"])


def test_bad_concept_table_fails_before_ray_starts(it, tiny_checkpoint, tmp_path):
    """In a fresh interpreter: run_job raises naming file, row and field; Ray never started."""
    it.write_images(tmp_path / "images", 2)
    cat, person = it.CAT, it.PERSON
    bad = {
        "bad-uuid.csv": f"class_id,name,text\n{cat},cat,cat\nnot-a-uuid,dog,dog\n",
        "empty-prompt.csv": f"class_id,name,text\n{cat},cat,cat\n\n{person},,\n",
        "min-score.csv": f"class_id,name,text,min_score\n{cat},cat,cat,1.5\n",
    }
    for name, text in bad.items():
        it.write_concepts(tmp_path / name, text)
    script = textwrap.dedent(
        f"""
        import json
        from sam3ray.config import JobConfig
        from sam3ray.core.errors import PromptTableError
        from sam3ray.runner.job import run_job
        messages = {{}}
        for name in {sorted(bad)!r}:
            cfg = JobConfig.model_validate({{
                "input": {{"uris": [{str(tmp_path / "images")!r}]}},
                "prompts": {{"concepts": {str(tmp_path)!r} + "/" + name}},
                "model": {{"checkpoint": {tiny_checkpoint!r}, "device": "cpu"}},
                "output": {{"uri": {str(tmp_path / "labels")!r}}},
            }})
            try:
                run_job(cfg)
            except PromptTableError as exc:
                messages[name] = str(exc)
        import ray
        print(json.dumps({{"messages": messages, "ray_initialized": ray.is_initialized()}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ray_initialized"] is False
    msgs = result["messages"]
    assert "bad-uuid.csv row 3: class_id 'not-a-uuid' is not a UUID" in msgs["bad-uuid.csv"]
    assert "empty-prompt.csv row 4: text: empty prompt" in msgs["empty-prompt.csv"]
    assert "min-score.csv row 2: min_score 1.5 is not within 0..1" in msgs["min-score.csv"]
    assert not (tmp_path / "labels").exists(), "nothing is written before validation passes"


def test_pool_leaving_no_cpu_for_commit_is_refused_not_hung(it, tiny_checkpoint, tmp_path):
    """resources.actors [2, 2] x (cpus_per_actor 1 + decode_cpus 0.5) on a 2-CPU Ray: the
    pool's minimum takes more than every CPU, so no commit task could ever be scheduled.
    The job must say so (naming the resources.* fields) instead of waiting forever. Its
    own Ray, in its own process group, killed after 60 s: a hang must not take the
    session's Ray down with it.
    shard_size 1 gives 4 shards, so the pool minimum is never cut to the shard count
    (at shard_size 2, content-defined cuts over tmp paths can make one shard of 4)."""
    images = tmp_path / "images"
    it.write_images(images, 4)
    concepts = it.write_concepts(tmp_path / "concepts.csv")
    # An earlier run's labels: overwrite mode must not touch them before the checks pass.
    kept = [tmp_path / "labels" / "_markers" / "s0.json", tmp_path / "labels" / "images" / "x"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("an earlier run's file")
    script = textwrap.dedent(
        f"""
        import json, time, ray
        from sam3ray.config import JobConfig
        from sam3ray.runner.job import run_job
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 1024 * 1024)
        cfg = JobConfig.model_validate({{
            "input": {{"uris": [{str(images)!r}]}},
            "prompts": {{"concepts": {concepts!r}}},
            "model": {{"checkpoint": {tiny_checkpoint!r}, "device": "cpu", "dtype": "float32"}},
            "resources": {{"gpus_per_actor": 0, "cpus_per_actor": 1, "actors": [2, 2],
                           "decode_cpus": 0.5}},
            "output": {{"uri": {str(tmp_path / "labels")!r}, "shard_size": 1,
                        "mode": "overwrite"}},
        }})
        t0 = time.perf_counter()
        try:
            run_job(cfg)
            out = {{"raised": None}}
        except Exception as exc:
            out = {{"raised": type(exc).__name__, "message": str(exc)}}
        out["seconds"] = time.perf_counter() - t0
        print(json.dumps(out), flush=True)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the group this test started: driver, raylet, workers
        proc.communicate()
        pytest.fail("run_job hung with an actor pool that leaves no CPU for commit tasks")
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["raised"] == "ConfigError", "expected a refusal naming resources.*"
    assert "resources.decode_cpus" in result["message"], result
    assert all(p.read_text() == "an earlier run's file" for p in kept), "refused, not cleared"


def test_a_crash_after_ray_started_still_writes_the_summary(
    it, ray_session, tiny_checkpoint, concepts_csv, tmp_path, monkeypatch
):
    """The pipeline dies mid-run (here: the driver loses the cluster after one shard):
    the CLI exits 1 and ``runs/<run_id>.json`` says failed, with the error and the
    shards that were committed before it."""
    from sam3ray.runner import pipelines

    it.write_images(tmp_path / "images", 4)
    real = pipelines.label_pipeline

    def dies_after_one_shard(*args, **kwargs):
        for summary in real(*args, **kwargs):
            yield summary
            raise ConnectionError("lost the Ray cluster")

    monkeypatch.setattr(pipelines, "label_pipeline", dies_after_one_shard)
    cfg = it.job_config(
        uris=[str(tmp_path / "images")],
        concepts=concepts_csv,
        checkpoint=tiny_checkpoint,
        output=str(tmp_path / "labels"),
        run_id="crash",
        shard_size=1,
    )
    config = tmp_path / "job.yaml"
    config.write_text(it.config_yaml(cfg))
    code, _, stderr = _cli(["run", str(config)])
    assert code == 1, stderr
    assert "CRASHED: ConnectionError: lost the Ray cluster" in stderr
    summary = json.loads((tmp_path / "labels" / "runs" / "crash.json").read_text())
    assert summary["status"] == "failed"
    assert summary["failure"] == "ConnectionError: lost the Ray cluster"
    assert summary["shards"]["done_now"] == 1 and summary["inputs_processed"] == 1


# -- CLI --------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``sam3ray`` in this process (reusing the session's Ray): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_run_with_overrides(it, ray_session, tiny_checkpoint, concepts_csv, tmp_path):
    uris = it.write_images(tmp_path / "images", 6)
    cfg = it.job_config(
        uris=[str(tmp_path / "images")],
        concepts=concepts_csv,
        checkpoint=tiny_checkpoint,
        output=str(tmp_path / "not-this-one"),
        run_id="cli-ok",
    )
    config = tmp_path / "job.yaml"
    config.write_text(it.config_yaml(cfg))
    out = tmp_path / "labels"

    code, stdout, stderr = _cli(
        ["run", str(config), "--set", f"output.uri={out}", "--set", "inference.conf=0.3"]
    )
    assert code == 0, stderr
    assert "run cli-ok: succeeded" in stdout and "inputs 6 (processed 6" in stdout
    assert f"summary: {out}/runs/cli-ok.json" in stdout
    assert not (tmp_path / "not-this-one").exists()

    summary = json.loads((out / "runs" / "cli-ok.json").read_text())
    assert summary["config"]["inference"]["conf"] == 0.3
    images, detections = it.read_output(str(out))
    it.check_images_invariant(images, detections, uris)
    scores = detections.column("score").to_pylist()
    # The override took effect: nothing under 0.3, something in [0.3, 0.4).
    assert min(scores) >= 0.3 - 1e-6 and any(s < 0.4 for s in scores)


def test_cli_config_error_exits_2(tmp_path):
    """The installed console script, in its own process: exit code 2, message on stderr."""
    config = tmp_path / "bad.yaml"
    config.write_text(
        "input: {uris: [images]}\nprompts: {concepts: c.csv}\n"
        "model: {checkpoint: m.pt}\ninference: {conf: 4}\noutput: {uri: out}\n"
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "sam3ray"), "run", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{config}: inference.conf: Input should be less than or equal to 1" in proc.stderr
    assert proc.stdout == ""


def test_cli_error_rate_exceeded_exits_3(it, ray_session, tiny_checkpoint, concepts_csv, tmp_path):
    images = tmp_path / "images"
    it.write_images(images, 3)
    for i in range(3):  # 3 of 6 inputs are not images: error rate 0.5 > 0.2
        (images / f"broken-{i}.jpg").write_bytes(b"<html>not a jpeg</html>")
    inputs = sorted(str(p.resolve()) for p in images.rglob("*.*"))
    out = tmp_path / "labels"
    cfg = it.job_config(
        uris=[str(images)],
        concepts=concepts_csv,
        checkpoint=tiny_checkpoint,
        output=str(out),
        run_id="cli-fail",
        max_error_rate=0.2,
    )
    config = tmp_path / "job.yaml"
    config.write_text(it.config_yaml(cfg))

    code, stdout, stderr = _cli(["run", str(config)])
    assert code == 3, stderr
    assert "FAILED: error rate 0.500 exceeds output.max_error_rate 0.2" in stderr
    assert "run cli-fail: failed" in stdout and "error not_an_image: 3" in stdout

    summary = json.loads((out / "runs" / "cli-fail.json").read_text())
    assert summary["status"] == "failed" and "max_error_rate" in summary["failure"]
    assert (summary["ok"], summary["errors"]) == (3, 3)
    assert summary["errors_by_reason"] == {"not_an_image": 3}
    imgs, dets = it.read_output(str(out))
    it.check_images_invariant(imgs, dets, inputs)


# -- geometric prompts ------------------------------------------------------------------------


def test_geometric_prompts_and_exemplar_outside_image(
    it, ray_session, tiny_checkpoint, concepts_csv, direct_engine, tmp_path
):
    uris = it.write_images(tmp_path / "images", 6)
    inside, outside = uris[0], uris[1]
    box = (20.0, 30.0, 120.0, 140.0)  # inside every generated image (>= 160 px a side)
    geometric = tmp_path / "geometric.csv"
    geometric.write_text(
        "image_uri,class_id,kind,x0,y0,x1,y1,positive\n"
        f"{inside},{it.CAT},box,{box[0]},{box[1]},{box[2]},{box[3]},true\n"
        f"{outside},{it.PERSON},box,10,10,900,900,true\n"
    )
    out = str(tmp_path / "labels")
    cfg = it.job_config(
        uris=[str(tmp_path / "images")],
        concepts=concepts_csv,
        checkpoint=tiny_checkpoint,
        output=out,
        geometric=str(geometric),
    )
    summary = run_job(cfg)
    assert summary["status"] == "succeeded"
    assert (summary["ok"], summary["errors"]) == (5, 1)
    assert summary["errors_by_reason"] == {"exemplar_outside_image": 1}

    images, detections = it.read_output(out)
    it.check_images_invariant(images, detections, uris)
    rows = {r["uri"]: r for r in images.to_pylist()}
    bad = rows[outside]
    assert bad["status"] == "error" and bad["error_reason"] == "exemplar_outside_image"
    assert "outside" in bad["error"] and bad["n_detections"] == 0
    assert all(r["status"] == "ok" for u, r in rows.items() if u != outside)

    # The exemplar rode with the cat queries of its own image only.
    det = detections.to_pylist()
    cat_inside = [d for d in det if d["uri"] == inside and d["class_id"] == it.CAT]
    assert cat_inside and all(d["query"].endswith("+1 box") for d in cat_inside)
    assert not [d for d in det if d["uri"] != inside and "box" in d["query"]]

    # Exactly what the engine finds when given the same exemplar directly.
    want = it.engine_reference(
        direct_engine,
        [u for u in uris if u != outside],
        exemplars={inside: {it.CAT: [Exemplar("box", box)]}},
    )
    it.assert_same_as_engine(it.scores_by_key(detections), want)
