"""Read and decode a shard's images inside the model actor, ahead of the model.

Why in the actor and not a stage of its own: a Ray row that carried decoded
pixels was a whole shard of them (~590 MiB at the defaults, against Ray Data's
128 MiB blocks), and resizing there meant a second resample before the model's
own. Now rows carry URIs (a few KB), and the actor's :class:`ImageReader`
reads and decodes the next images in a bounded thread pool while the model
works: reads overlap (object-store GETs are latency-bound), Pillow decodes
without the GIL, and at most ``window`` decoded images wait at once. The
images reach the model at their original size (upright per EXIF, RGB), so the
model's one resize is the official one.

Every input becomes a :class:`DecodedImage`: pixels and size, or the reason it
has none. One poison file costs only itself.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from sam3ray.config.schema import InputConfig
from sam3ray.core.errors import error_reason, error_text
from sam3ray.sources.images import decode_image

T = TypeVar("T")


@dataclass(frozen=True)
class DecodedImage:
    """One input after decoding: its pixels and size, or why there are none."""

    uri: str
    image_id: str
    pixels: np.ndarray | None  # H×W×3 uint8, the upright original
    size: tuple[int, int] | None  # (height, width) of the upright original
    decode_ms: float
    error: str | None = None
    error_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_reason is None

    def without_pixels(self) -> DecodedImage:
        """The same record, pixels dropped (once the model has them)."""
        return DecodedImage(
            self.uri, self.image_id, None, self.size, self.decode_ms, self.error, self.error_reason
        )


def decode_one(source: InputConfig, uri: str, image_id: str) -> DecodedImage:
    """Read ``uri`` with the input's storage options and decode it; failures become data."""
    t0 = time.perf_counter()
    try:
        data = source.location(uri).read_bytes()
        img = decode_image(data, max_pixels=source.max_pixels)
        return DecodedImage(uri, image_id, img, (img.shape[0], img.shape[1]), _ms(t0))
    except Exception as exc:  # one poison file must not cost the shard
        return DecodedImage(uri, image_id, None, None, _ms(t0), error_text(exc), error_reason(exc))


class ImageReader:
    """Decoded images of a shard, in order, read by ``threads`` threads at most
    ``window`` images ahead of the consumer."""

    def __init__(self, source: InputConfig, threads: int, window: int) -> None:
        if threads < 1 or window < 1:
            raise ValueError("threads and window must be >= 1")
        self.source = source
        self.threads = threads
        self.window = window

    def read(self, uris: Sequence[str], image_ids: Sequence[str]) -> Iterator[DecodedImage]:
        """Yield one :class:`DecodedImage` per input, in input order."""
        args = ((self.source, u, i) for u, i in zip(uris, image_ids, strict=True))
        return prefetch(decode_one, args, threads=self.threads, window=self.window)


def prefetch(
    fn: Callable[..., T], args: Iterable[tuple[Any, ...]], *, threads: int, window: int
) -> Iterator[T]:
    """``fn(*a)`` for each ``a`` of ``args``, in order, run in ``threads`` threads at most
    ``window`` calls ahead of the consumer (``args`` is read lazily too).

    Why not ``ThreadPoolExecutor.map``: it submits every input at once, so with a
    slower consumer (the model) all results would be made and held before the first
    is used. The pool lives as long as the generator: closing it (a consumer that
    stops early) cancels what has not started and waits for what has.
    """
    if threads < 1 or window < 1:
        raise ValueError(f"threads and window must be >= 1, got {threads} and {window}")
    todo = iter(args)
    pending: deque[Future[T]] = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="sam3ray-decode")
    try:
        for nxt in itertools.islice(todo, window):
            pending.append(pool.submit(fn, *nxt))
        while pending:
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(fn, *nxt))
            yield pending.popleft().result()  # the frame keeps no result while suspended
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
