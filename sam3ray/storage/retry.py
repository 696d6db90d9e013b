"""The one retry policy of the job: what counts as transient, and how long to wait.

Storage clients (botocore, s3fs) retry for a few seconds and give up under
sustained throttling; thousands of Ray tasks throttled at once must then back
off with jitter instead of failing shards. Final errors (missing, forbidden,
a full disk) raise at once: retrying them only delays the error row.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {
    "slowdown", "throttling", "throttlingexception", "throttledexception", "requestthrottled",
    "requestlimitexceeded", "toomanyrequestsexception", "requesttimeout",
    "requesttimeoutexception", "internalerror", "serviceunavailable", "503", "500", "502",
    "504", "429",
}  # fmt: skip
_TRANSIENT_NAMES = ("connection", "timeout", "throttl", "slowdown", "disconnected",
                    "incompleteread", "responsestreaming", "clientpayload")  # fmt: skip
_FINAL_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
    errno.EISDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.ENOENT,
}  # fmt: skip


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure (exponential backoff, jitter)."""

    retries: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0


#: Reads and listings: a throttled GET should not cost an input its labels.
READS = RetryPolicy(retries=5, base_delay=0.2, max_delay=10.0)
#: Shard writes, markers and the run summary: idempotent, and losing one costs a shard.
WRITES = RetryPolicy(retries=8, base_delay=0.5, max_delay=30.0)


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), status


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: throttling, 5xx, dropped connections, timeouts."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return False
        code, status = _error_code(err)
        if code is not None or status is not None:
            return (code or "").lower() in _TRANSIENT_CODES or (status or 0) >= 500 or status == 429
    for err in chain:
        if isinstance(err, OSError) and err.errno in _FINAL_ERRNOS:
            return False  # a full or read-only disk does not heal in a minute of retries
        name = type(err).__name__.lower()
        if isinstance(err, (OSError, ConnectionError, TimeoutError)) or any(
            n in name for n in _TRANSIENT_NAMES
        ):
            return True
    return False


def retry_transient(fn: Callable[[], T], what: str, policy: RetryPolicy = READS) -> T:
    """Call ``fn()`` (idempotent), retrying it while it fails transiently (see module doc)."""
    for attempt in range(policy.retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= policy.retries or not is_transient(exc):
                raise
            cap = min(policy.max_delay, policy.base_delay * 2**attempt)
            delay = cap / 2 + random.uniform(0, cap / 2)
            logger.warning("%s failed (%r); retry %d in %.2fs", what, exc, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
