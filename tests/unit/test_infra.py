"""Static checks of infra/: the manifests carry what KubeRay needs and agree with each
other and with the job config they ship; the image's pins satisfy pyproject.toml; the
Dockerfile installs the project as a non-root user without weights.

No cluster or Docker engine is needed; the point is to catch drift (a raised actor
count without GPUs for it, a dependency bump the image misses) at unit-test time.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

from sam3ray.config import JobConfig, redact

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
DOCKER = INFRA / "docker"
#: GPUs per instance for the EC2 types the `ray up` config may name.
EC2_GPUS = {
    **{f"g5.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    **{f"g6.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8,
}  # fmt: skip
#: The image's platform: requirement markers are evaluated for it, not for this machine.
IMAGE_ENV = {
    **default_environment(),
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "implementation_name": "cpython",
}


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _one(name: str, kind: str) -> dict[str, Any]:
    docs = [d for d in _docs(name) if d.get("kind") == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}"
    return docs[0]


def _cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "raycluster.yaml": _one("raycluster.yaml", "RayCluster")["spec"],
        "rayjob.yaml": _one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
        "raycronjob.yaml": _one("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"][
            "rayClusterSpec"
        ],
    }


def _job_specs() -> dict[str, dict[str, Any]]:
    return {
        "rayjob.yaml": _one("rayjob.yaml", "RayJob")["spec"],
        "raycronjob.yaml": _one("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"],
    }


def _pins() -> dict[str, Requirement]:
    """infra/docker/requirements.txt as name -> Requirement (every line must be ``==``)."""
    pins = {}
    for raw in (DOCKER / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not pinned with ==: {raw}"
        assert "*" not in specs[0].version, f"wildcard pin: {raw}"
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = req
    return pins


def _pin_version(req: Requirement) -> Version:
    return Version(next(iter(req.specifier)).version)


def _job_config() -> tuple[str, JobConfig, dict[str, str]]:
    """(entrypoint config path, its JobConfig, the ConfigMap data) for the RayJob."""
    spec = _one("rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["sam3ray", "run"], spec["entrypoint"]
    path = argv[2]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    mount = next(
        m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")
    )
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    cm_name = volume["configMap"]["name"]
    cm = next(d for d in _docs("configmap.yaml") if d["metadata"]["name"] == cm_name)
    key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    assert key in cm["data"], f"{path}: no key {key!r} in ConfigMap {cm_name}"
    cfg = JobConfig.model_validate(yaml.safe_load(cm["data"][key]))  # no path checks
    return path, cfg, cm["data"]


# -- KubeRay manifests ---------------------------------------------------------------------


def test_every_manifest_parses_with_kind_and_name() -> None:
    files = sorted(KUBERAY.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "configmap.yaml",
    }  # fmt: skip
    for f in files:
        for doc in _docs(f.name):
            assert doc.get("apiVersion") and doc.get("kind"), f.name
            assert doc["metadata"]["name"], f.name
            if doc["kind"].startswith("Ray"):
                assert doc["apiVersion"] == "ray.io/v1", f.name


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"])
def test_cluster_spec_has_what_kuberay_needs(name: str) -> None:
    spec = _cluster_specs()[name]
    assert spec["rayVersion"] == str(_pin_version(_pins()["ray"]))
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {}), "CPU head"
    groups = spec["workerGroupSpecs"]
    gpu_groups = [
        g for g in groups if g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
            "nvidia.com/gpu")
    ]  # fmt: skip
    assert gpu_groups, "a GPU worker group"
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    for g in gpu_groups:
        # the driver checks for GPUs at start: with 0 GPU workers it would run on CPU
        assert g["minReplicas"] >= 1, "GPU group must start with a worker"
    pods = [head["template"]["spec"], *(g["template"]["spec"] for g in groups)]
    images = {c["image"] for p in pods for c in p["containers"]}
    assert len(images) == 1, f"one image everywhere: {images}"
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_three_copies_of_the_cluster_spec_are_identical() -> None:
    specs = _cluster_specs()
    assert specs["rayjob.yaml"] == specs["raycluster.yaml"]
    assert specs["raycronjob.yaml"] == specs["raycluster.yaml"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml"])
def test_job_spec(name: str) -> None:
    job = _job_specs()[name]
    assert job["entrypoint"] == "sam3ray run /config/job.yaml"
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0
    assert job.get("activeDeadlineSeconds", 1) > 0


def test_cron_schedule() -> None:
    cron = _one("raycronjob.yaml", "RayCronJob")["spec"]
    fields = cron["schedule"].split()
    assert len(fields) == 5, cron["schedule"]
    assert cron.get("suspend") in (None, False)
    # no concurrencyPolicy in RayCronJob: a run must end before the next one starts
    assert cron["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


def test_entrypoint_config_is_in_configmap_and_validates(tmp_path) -> None:
    from sam3ray.sources.prompts import load_concepts
    from sam3ray.storage.location import Location

    _, cfg, data = _job_config()
    assert cfg.prompts.concepts.startswith("/config/")
    key = cfg.prompts.concepts.removeprefix("/config/")
    assert key in data, f"concepts table {key} not in the ConfigMap"
    (tmp_path / key).write_text(data[key])
    concepts = load_concepts(Location(str(tmp_path / key)))
    assert len(concepts) >= 1
    assert cfg.model.checkpoint.startswith("s3://"), "checkpoint from object storage"
    assert all(u.startswith("s3://") for u in cfg.input.uris)
    assert cfg.output.uri.startswith("s3://")
    assert cfg.resources.gpus_per_actor == 0.25 and tuple(cfg.resources.actors) == (1, 8)
    assert redact(cfg) == cfg.model_dump(mode="json"), "no credentials in the job config"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"])
def test_enough_gpus_for_the_largest_actor_pool(name: str) -> None:
    _, cfg, _ = _job_config()
    need = cfg.resources.gpus_per_actor * cfg.resources.actors[1]
    have = 0.0
    for g in _cluster_specs()[name]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        have += float(limits.get("nvidia.com/gpu", 0)) * g["maxReplicas"]
    assert have >= need, f"{name}: {have} GPUs at max scale < {need} needed by the job"


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_credentials_only_from_secrets() -> None:
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)
    env_count = 0
    for f in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(f.name):
            assert doc["kind"] != "Secret", f"{f.name}: no Secret manifests with values"
            for node in _walk(doc):
                for env in node.get("env", []) if isinstance(node.get("env"), list) else []:
                    if secretish.search(env["name"]):
                        env_count += 1
                        assert "value" not in env, f"{f.name}: inline {env['name']}"
                        assert env["valueFrom"]["secretKeyRef"]["name"], env
    assert env_count > 0, "storage credentials reach the pods"


# -- ray up ----------------------------------------------------------------------------------


def test_ray_up_config_validates_and_is_consistent() -> None:
    import jsonschema
    import ray

    cfg = yaml.safe_load((INFRA / "ray-cluster" / "aws.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    kube_image = _cluster_specs()["raycluster.yaml"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    assert cfg["docker"]["image"] == kube_image, "one image for ray up and KubeRay"
    types = cfg["available_node_types"]
    gpu_types = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert gpu_types
    for name, t in gpu_types.items():
        itype = t["node_config"]["InstanceType"]
        assert itype.split(".")[0] in ("g5", "g6"), f"{name}: {itype}"
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    assert any(t["min_workers"] >= 1 for t in gpu_types.values()), "a GPU node at start"
    _, job, _ = _job_config()
    need = job.resources.gpus_per_actor * job.resources.actors[1]
    best = max(EC2_GPUS[t["node_config"]["InstanceType"]] for t in gpu_types.values())
    assert best * cfg["max_workers"] >= need
    assert cfg["setup_commands"], "setup commands check the image"


# -- the image -----------------------------------------------------------------------------


def test_pins_satisfy_pyproject_and_constraints() -> None:
    pins = _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    constraints = [
        Requirement(line.split("#", 1)[0].strip())
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]
    for req in [*reqs, *constraints]:
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req} is not pinned in infra/docker/requirements.txt"
        pin = pins[name]
        version = _pin_version(pin)
        # torch may carry a CUDA local version (2.x.y+cu13x): compare the public one
        public = Version(version.public)
        assert req.specifier.contains(public, prereleases=True), f"{pin} does not satisfy {req}"
        assert req.extras <= pin.extras, f"{pin} lacks extras {req.extras - pin.extras}"


def test_pins_cover_what_the_cluster_needs() -> None:
    pins = _pins()
    assert {"default", "data"} <= pins["ray"].extras, "the head runs the dashboard (Jobs API)"
    assert str(_pin_version(pins["sam3"])) == "0.1.4"
    # torch 2.13.0's own metadata pins triton==3.7.1 on Linux
    if _pin_version(pins["torch"]).public == "2.13.0":
        assert str(_pin_version(pins["triton"])) == "3.7.1"


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instr, _, args = line.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def test_dockerfile_installs_project_as_non_root_without_weights() -> None:
    steps = _dockerfile()
    args = {k: v for k, v in (a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)}
    base = next(a for i, a in steps if i == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
    ray_version = str(_pin_version(_pins()["ray"]))
    assert ray_version in base and "py311" in base, f"base image {base} vs ray {ray_version}"
    copies = [a for i, a in steps if i in ("COPY", "ADD")]
    runs = " && ".join(a for i, a in steps if i == "RUN")
    assert any("infra/docker/requirements.txt" in c for c in copies)
    assert re.search(r"pip install [^&;]*-r /tmp/requirements.txt", runs)
    assert any(c.split()[-2] == "sam3ray" for c in copies), "the package is copied"
    assert any("pyproject.toml" in c for c in copies)
    assert re.search(r"pip install [^&;]*--no-deps \.", runs), "the project is installed"
    weights = re.compile(r"\.(pt|pth|ckpt|safetensors|bin)\b|artifacts|\bout/")
    for c in copies:
        assert not weights.search(c), f"weights or outputs copied into the image: {c}"
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "runs as a non-root user"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert "**/*.pt" in ignore and "**/*.safetensors" in ignore
