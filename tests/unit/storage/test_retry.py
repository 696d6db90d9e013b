"""The one retry policy: what is transient, how often and how long reads are retried."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from sam3ray.storage import retry as retry_module
from sam3ray.storage.location import Location
from sam3ray.storage.retry import READS, WRITES, RetryPolicy, is_transient, retry_transient


def client_error(code: str, status: int) -> ClientError:
    body = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(body, "GetObject")


def test_is_transient():
    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("Whatever", 502))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(client_error("AccessDenied", 403))
    wrapped = OSError(errno.EIO, "slow")
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert is_transient(wrapped)
    denied = OSError(errno.EIO, "x")
    denied.__cause__ = client_error("InvalidAccessKeyId", 403)
    assert not is_transient(denied)
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not is_transient(FileNotFoundError("x")) and not is_transient(PermissionError())
    assert not is_transient(ValueError("bad"))


def test_full_or_read_only_disks_are_final():
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOENT):
        assert not is_transient(OSError(code, "final")), errno.errorcode[code]
    assert is_transient(OSError(errno.EIO, "I/O error"))
    assert is_transient(client_error("", 429))


def test_read_bytes_retries_only_transient_errors(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"data")
    loc = Location(str(path))
    fs = loc.fs
    calls: list[str] = []

    def flaky(p, *a, **k):
        calls.append(p)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "503 Slow Down")
        return b"data"

    monkeypatch.setattr(fs, "cat_file", flaky)
    assert loc.read_bytes(RetryPolicy(base_delay=0.0)) == b"data" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError):
        loc.read_bytes(RetryPolicy(retries=1, base_delay=0.0))
    assert len(calls) == 2  # one try + one retry

    def denied(p, *a, **k):
        calls.append(p)
        raise PermissionError("AccessDenied")

    calls.clear()
    monkeypatch.setattr(fs, "cat_file", denied)
    with pytest.raises(PermissionError):
        loc.read_bytes(RetryPolicy(base_delay=0.0))
    assert len(calls) == 1


def test_backoff_is_exponential_jittered_and_capped(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(retry_module.time, "sleep", slept.append)
    calls = []

    def throttled():
        calls.append(1)
        raise client_error("SlowDown", 503)

    policy = RetryPolicy(retries=5, base_delay=1.0, max_delay=3.0)
    with pytest.raises(ClientError):
        retry_transient(throttled, "x", policy)
    assert len(calls) == 6 and len(slept) == 5
    for delay, cap in zip(slept, [1.0, 2.0, 3.0, 3.0, 3.0], strict=True):
        assert cap / 2 <= delay <= cap, (delay, cap)


def test_default_policies():
    assert READS.retries >= 1 and WRITES.retries >= READS.retries
    assert 0 < READS.base_delay <= READS.max_delay and 0 < WRITES.base_delay <= WRITES.max_delay
    assert RetryPolicy() == READS
