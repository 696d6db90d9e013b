"""Fault injection as a wrapper stage: the production code has no switches for it.

:class:`ExitOnShard` wraps a real stage and hard-exits its process (``os._exit``,
as a segfault or an OOM kill would) on its N-th shard, after the work and
before the result is returned, so the shard's work is lost and must be redone
by a restarted actor. It fires once per job: the first process to fire creates
a file in ``state_dir`` (O_EXCL), and restarted actors see it and carry on.

:func:`crash_actors` installs it in the job's image pipeline for one test.
"""

from __future__ import annotations

import os
from typing import Any


class ExitOnShard:
    """A stage that behaves like ``inner`` but kills its process once, on shard ``n``."""

    def __init__(self, inner: Any, n: int, state_dir: str) -> None:
        self.inner = inner
        self.n = n
        self.state_dir = state_dir
        self.name = inner.name
        self.resources = inner.resources
        self.seen = 0

    def setup(self) -> None:
        self.inner.setup()

    def process(self, task: Any) -> Any:
        out = self.inner.process(task)
        self.seen += 1
        if self.seen == self.n:
            marker = os.path.join(self.state_dir, "actor-exit.fired")
            try:  # O_EXCL: exactly one process in the whole job wins
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return out
            os.write(fd, f"pid {os.getpid()} shard {self.n}\n".encode())
            os.close(fd)
            os._exit(17)
        return out


def crash_actors(monkeypatch: Any, n: int, state_dir: str) -> None:
    """Make the image pipeline's segment actors exit hard on their ``n``-th shard (once)."""
    import ray.cloudpickle

    import tests.support.faults as this
    from sam3ray.runner import pipelines

    real = pipelines.SegmentStage
    ray.cloudpickle.register_pickle_by_value(this)  # workers need not import tests/

    def wrapped(*args: Any, **kwargs: Any) -> ExitOnShard:
        return ExitOnShard(real(*args, **kwargs), n, state_dir)

    monkeypatch.setattr(pipelines, "SegmentStage", wrapped)
