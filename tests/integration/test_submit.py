"""``sam3ray submit`` end to end against a real Ray head on 127.0.0.1.

The head is started here with ``ray start --head --block`` in its own session
and temp dir, on free ports, and stopped by killing exactly the process tree
it started: ``ray stop`` would stop every Ray on the machine, including other
test runs'. Submission runs through the CLI in a subprocess, so this cannot
collide with a ``ray.init()`` session in this pytest process. The head runs
with token auth, Ray 2.60's default for new clusters.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
N_GENERATED = 4  # + the 10 bundled photos = 14 images


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's env without any pointer at another Ray, plus ``extra``; the venv's
    bin first on PATH, as the image has it (the job's entrypoint is ``sam3ray run``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API"))}
    path = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(RAY_USAGE_STATS_ENABLED="0", TORCHDYNAMO_DISABLE="1", PATH=path, **extra)
    return env


@dataclass
class Head:
    address: str
    env: dict[str, str]  # carries the head's auth token for clients


def _stop_tree(proc: subprocess.Popen) -> None:
    """Stop exactly what ``proc`` (``ray start --block``) started.

    Descendants are listed before anything dies (afterwards they would be re-parented
    and untraceable), then get SIGTERM: the whole session by process group, plus any
    descendant in a session of its own (Ray starts job drivers that way). ``ray start``
    shuts down slowly on SIGTERM, so what is left after 5 s gets SIGKILL.
    """
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: pgid == pid
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)  # reaps ``proc`` too (our child)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    token = secrets.token_hex(32)
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    probe = [str(BIN / "python"), "-c", "import ray.dashboard.optional_deps"]
    if subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode:
        pytest.skip("the Ray Jobs API needs the dashboard: install ray[default]")
    tmp = tempfile.mkdtemp(prefix="s3r-submit-", dir="/tmp")  # short: Ray puts sockets under it
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, nm, om = _free_ports(9)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        "--include-dashboard=true", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}",
        "--num-cpus=2", f"--temp-dir={tmp}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(tmp) / "ray-start.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            req = urllib.request.Request(
                f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                if urllib.request.urlopen(req, timeout=5).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (Path(tmp) / "ray-start.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"Ray head did not come up (rc={proc.poll()}):\n{tail}")
            time.sleep(1)
        yield Head(address=address, env=env)
    finally:
        _stop_tree(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _sam3ray(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "sam3ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory) -> tuple[Path, Path]:
    """(config, output dir): configs/local-demo.yaml pointed at fresh tiny model + images."""
    root = tmp_path_factory.mktemp("submit")
    env = _clean_env()
    jobs = [
        subprocess.Popen(
            [str(BIN / "sam3ray"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in (
            ["make-tiny-checkpoint", str(root / "sam3-tiny.pt")],
            ["sample-data", str(root / "images"), "--generated", str(N_GENERATED)],
        )
    ]
    for job in jobs:
        out, _ = job.communicate(timeout=300)
        assert job.returncode == 0, out
    cfg = yaml.safe_load((REPO / "configs" / "local-demo.yaml").read_text())
    cfg["input"]["uris"] = [str(root / "images")]
    cfg["prompts"]["concepts"] = str(REPO / "configs" / "concepts-demo.csv")
    cfg["model"]["checkpoint"] = str(root / "sam3-tiny.pt")
    cfg["output"]["uri"] = str(root / "out")
    cfg["resources"]["actors"] = [1, 1]
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, root / "out"


def test_refuses_local_paths_without_flag(demo_job) -> None:
    """Local inputs/checkpoint/output are named and refused before any connection."""
    config, _ = demo_job
    r = _sam3ray("submit", str(config), "--address", "http://127.0.0.1:9", env=_clean_env(),
                 timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    for field in ("input.uris[0]", "model.checkpoint", "output.uri", "--allow-local-paths"):
        assert field in r.stderr


@pytest.mark.slow
def test_submit_wait_runs_demo_to_success(ray_head: Head, demo_job) -> None:
    import pyarrow.parquet as pq

    config, out = demo_job
    r = _sam3ray(
        "submit", str(config), "--address", ray_head.address, "--wait",
        "--allow-local-paths", "--set", "inference.max_det=50", "--set", "run_id=submit-test",
        env=ray_head.env, timeout=540,
    )  # fmt: skip
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    job_id = r.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_"), r.stdout[:500]
    assert f"job {job_id}: SUCCEEDED" in r.stderr
    assert "run submit-test: succeeded" in r.stdout  # the job's own summary, via tail logs

    images = pq.read_table(out / "images").to_pylist()
    assert len(images) == 10 + N_GENERATED
    assert {row["status"] for row in images} == {"ok"}
    assert {row["run_id"] for row in images} == {"submit-test"}
    summary = yaml.safe_load((out / "runs" / "submit-test.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["config"]["inference"]["max_det"] == 50  # --set reached the cluster
    assert summary["inputs_total"] == 10 + N_GENERATED


def test_working_dir_ships_tables_and_keeps_object_store_paths(tmp_path) -> None:
    """Local tables are copied and re-pointed; s3:// paths and --set values travel as is."""
    from sam3ray.config import load_config
    from sam3ray.runner.submit import build_working_dir, local_paths

    concepts = tmp_path / "tables" / "my-concepts.CSV"
    concepts.parent.mkdir()
    concepts.write_text((REPO / "configs" / "concepts-demo.csv").read_text())
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"uris": ["s3://bucket/images/**/*.jpg"]},
                "prompts": {"concepts": "tables/my-concepts.CSV"},
                "model": {"checkpoint": "s3://models/sam3.pt"},
                "output": {"uri": "s3://bucket/labels/"},
            }
        )
    )
    cfg = load_config(config, ["inference.conf=0.3"])
    assert local_paths(cfg) == []
    shipped = tmp_path / "wd"
    shipped.mkdir()
    job_yaml = build_working_dir(cfg, shipped)
    data = yaml.safe_load(job_yaml.read_text())
    assert data["prompts"]["concepts"] == "concepts.csv"
    assert (shipped / "concepts.csv").read_text() == concepts.read_text()
    assert data["input"]["uris"] == ["s3://bucket/images/**/*.jpg"]
    assert data["model"] == {"checkpoint": "s3://models/sam3.pt"}  # only what the user set
    assert data["inference"] == {"conf": 0.3}
    assert "resources" not in data  # defaults stay the cluster's own


def test_runtime_env_pip_ships_package_and_dependencies(tmp_path) -> None:
    from sam3ray.runner.submit import runtime_env_for

    plain = runtime_env_for(tmp_path, pip=False)
    assert plain == {"working_dir": str(tmp_path)}
    env = runtime_env_for(tmp_path, pip=True)
    pkgs = env["pip"]["packages"]
    assert any(p.startswith("sam3==") for p in pkgs)
    assert not any(p.split("[")[0].split(">")[0].strip() == "ray" for p in pkgs), "never ray"
    assert Path(env["py_modules"][0]).name == "sam3ray"
