"""The one adapter: any stage becomes a Ray Data operator.

A row on the wire is ``{"key": <shard id>, "payload": <pickled task>}``: the
typed hand-offs of ``stages.tasks`` travel whole (Arrow tables pickle without
copies under protocol 5), and Ray Data sees two columns it can move as Arrow.
No row carries pixels: a task is a shard's URIs, a result its label tables.
Light stages run as tasks; stages that declare ``actor=True`` run in an
autoscaling actor pool whose members call ``setup()`` once (the model load) and
then ``process`` shard after shard. A dead actor is restarted and its
shard retried (Ray Data's actor-pool defaults: max_restarts/max_task_retries -1).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import ray

from sam3ray.stages.base import Stage


def pack(obj: Any, key: str) -> dict[str, Any]:
    return {"key": key, "payload": pickle.dumps(obj, protocol=5)}


def unpack(row: dict[str, Any]) -> Any:
    return pickle.loads(row["payload"])


def _key(obj: Any) -> str:
    task = getattr(obj, "task", obj)  # ShardResult -> ShardTask
    return str(getattr(task, "shard_id", ""))


def dataset_of(items: Sequence[Any]) -> ray.data.Dataset:
    """A dataset of typed tasks, one block each (a shard is the unit of scheduling)."""
    rows = [pack(item, _key(item)) for item in items]
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))


def _task_fn(stage: Stage) -> Any:
    """A row function for a task stage, named after it (Ray Data shows ``Map(commit)``)."""

    def run(row: dict[str, Any]) -> dict[str, Any]:
        stage.setup()  # idempotent; light for task stages
        return pack(stage.process(unpack(row)), row["key"])

    run.__name__ = run.__qualname__ = stage.name
    return run


class _StageActor:
    """One stage instance per actor, set up in the constructor (model loaded once)."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [_run_actor(self.stage, r) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows)


def _run_actor(stage: Stage, row: dict[str, Any]) -> dict[str, Any]:
    return pack(stage.process(unpack(row)), row["key"])


def apply(
    ds: ray.data.Dataset,
    stage: Stage,
    *,
    n_rows: int,
    num_gpus: float | None = None,
    ray_remote_args: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """``ds`` mapped through ``stage`` with the resources it declares.

    ``num_gpus`` overrides the stage's GPU share (the runner falls back to CPU
    actors on a cluster without GPUs); ``n_rows`` caps the actor pool.
    """
    r = stage.resources
    extra = dict(ray_remote_args or {})
    if not r.actor:
        return ds.map(_task_fn(stage), num_cpus=r.cpus, **extra)
    lo, hi = r.actors
    hi = max(1, min(hi, n_rows))
    actor_class = type(stage.name, (_StageActor,), {})  # Ray Data shows MapBatches(segment)
    return ds.map_batches(
        actor_class,
        fn_constructor_args=(stage,),
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=min(lo, hi), max_size=hi),
        num_gpus=r.gpus if num_gpus is None else num_gpus,
        num_cpus=r.cpus,
        **extra,
    )


def results(ds: ray.data.Dataset) -> Iterator[Any]:
    """The typed outputs of the last stage, as they finish."""
    for row in ds.iter_rows():
        yield unpack(row)
