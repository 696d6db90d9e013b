"""The one shape of a stage: declared resources, ``setup()`` once, ``process(task)``.

Stages know nothing of the engine that runs them. ``runner.adapter`` turns any
stage into a Ray Data operator (a task for light stages, an actor pool for
stages with heavy state); tests and the Ray Data operator of users' own
pipelines call the same objects directly. Hand-offs between stages are the
frozen types of :mod:`sam3ray.stages.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

In = TypeVar("In", contravariant=True)
Out = TypeVar("Out", covariant=True)


@dataclass(frozen=True)
class Resources:
    """What one running copy of a stage needs.

    ``actor``: the stage holds heavy state built by ``setup()`` (a model), so it
    runs in a pool of long-lived actors of ``actors`` = (min, max) size; otherwise
    in stateless tasks.
    """

    cpus: float = 1.0
    gpus: float = 0.0
    actor: bool = False
    actors: tuple[int, int] = (1, 1)


@runtime_checkable
class Stage(Protocol[In, Out]):
    """A step of the job: ``setup()`` builds heavy state once, ``process`` maps one task.

    ``process`` must not raise for a bad input (it becomes data: an error row);
    an exception means the whole task failed and is retried by the runner.
    """

    name: str
    resources: Resources

    def setup(self) -> None: ...

    def process(self, task: In) -> Out: ...
