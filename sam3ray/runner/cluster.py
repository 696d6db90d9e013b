"""The Ray cluster a job runs on: start or join it, and check the job fits it.

Checks that can refuse a job run here, before anything is written: a local Ray
whose pool minimum leaves no CPU for commit tasks would wait forever,
and ``model.device: cuda`` on a cluster without GPUs cannot run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from sam3ray.config.checks import where
from sam3ray.config.schema import JobConfig, ModelConfig, ResourcesConfig
from sam3ray.core.errors import ConfigError
from sam3ray.runner.planning import PLAN_READ_CPUS
from sam3ray.stages.commit import COMMIT_CPUS

logger = logging.getLogger(__name__)


def is_local(cfg: JobConfig) -> bool:
    return cfg.resources.ray_address in (None, "local")


def init_ray(cfg: JobConfig) -> float:
    """Join ``resources.ray_address`` (or start a local Ray); seconds it took."""
    t0 = time.perf_counter()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": cfg.resources.ray_address, "log_to_driver": True}
        if cfg.resources.object_store_memory and is_local(cfg):
            kwargs["object_store_memory"] = cfg.resources.object_store_memory
        ray.init(**kwargs)
    return time.perf_counter() - t0


def check_pool_fits(cfg: JobConfig, n_shards: int) -> None:
    """Refuse a pool whose minimum leaves no CPU for the commit and plan-reading tasks: Ray
    would wait forever. Only for a local Ray, whose size is all it will ever be
    (an autoscaling cluster may add nodes)."""
    if not is_local(cfg) or n_shards == 0:
        return
    r = cfg.resources
    lo = min(r.actors[0], n_shards)
    need = lo * (r.cpus_per_actor + r.decode_cpus) + COMMIT_CPUS + PLAN_READ_CPUS
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(
            f"{where(cfg)}resources: the actor pool's minimum ({lo} × (resources.cpus_per_actor "
            f"{r.cpus_per_actor} + resources.decode_cpus {r.decode_cpus})) plus one commit "
            f"task ({COMMIT_CPUS}) and one plan reader ({PLAN_READ_CPUS}) needs {need:g} CPUs, "
            f"but this Ray has {have:g}: lower "
            "resources.actors[0], resources.cpus_per_actor or resources.decode_cpus"
        )


def gpus_per_actor(cfg: JobConfig) -> float:
    """The actors' GPU share; CPU actors on a cluster without GPUs unless CUDA was demanded."""
    return gpu_share(cfg.resources, cfg.model, where(cfg))


def gpu_share(resources: ResourcesConfig, model: ModelConfig, context: str = "") -> float:
    """``resources.gpus_per_actor`` on this Ray, from the sections alone (the job and the
    Ray Data operator agree): 0 on a cluster without GPUs, where an actor asking for a
    GPU share would wait forever, unless ``model.device`` demands CUDA (refused)."""
    want = resources.gpus_per_actor
    have = ray.cluster_resources().get("GPU", 0)
    if want > 0 and have == 0:
        if model.device == "cuda":
            raise ConfigError(f"{context}model.device is 'cuda' but the Ray cluster has no GPUs")
        logger.warning("no GPUs in the Ray cluster: running SAM 3 actors on CPU")
        return 0.0
    return want
