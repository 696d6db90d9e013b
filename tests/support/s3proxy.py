"""A flaky object store: an HTTP proxy on 127.0.0.1 in front of the moto S3 server.

It forwards every request to moto unchanged, except that a deterministic share of
them is answered ``503 SlowDown`` instead (the answer S3 gives when a prefix is
throttled), for reads, writes, listings and HEADs alike::

    with FlakyS3Proxy(moto_s3.endpoint_url, fail_rate=0.2) as proxy:
        opts = proxy.storage_options()       # s3fs options pointing at the proxy
        ...
        assert proxy.injected["PUT"] > 0

Which requests fail does not depend on thread timing: whether a request (method +
path + query) fails, and how many attempts in a row, is a hash of (seed, request),
so the same job always meets the same failures. ``fail_rate`` of the requests
fail once; of those, ``burst_share`` fail ``burst_failures`` attempts in a row
(a throttled prefix: as long as s3fs's own 5 tries, so the application's
retries must carry them), and so does the first request matching each of
``forced_bursts``. Every request eventually gets through, so a client
that retries enough always succeeds: the test is about retrying, not about luck.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>{rid}</RequestId></Error>"
)


class _Handler(BaseHTTPRequestHandler):
    owner: FlakyS3Proxy
    protocol_version = "HTTP/1.1"  # keep-alive, as clients expect from S3

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy = self.owner
        body = self._read_body()  # always consume the body: the connection stays in sync
        method = self.command
        if proxy.should_fail(method, self.path):
            proxy.record(method, self.path, True)
            payload = (
                b"" if method == "HEAD" else SLOW_DOWN.replace(b"{rid}", uuid.uuid4().hex.encode())
            )
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("x-amz-request-id", uuid.uuid4().hex[:16])
            self.end_headers()
            if payload:
                self.wfile.write(payload)
            return
        proxy.record(method, self.path, False)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers.pop("Expect", None)  # we already answered 100-continue ourselves
        if body or method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            conn.request(method, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() in _HOP_BY_HOP or k.lower() == "content-length":
                    continue
                self.send_header(k, v)
            if method == "HEAD":
                self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD" and data:
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815


class FlakyS3Proxy:
    """Threaded forwarding proxy that injects 503 SlowDown (see module doc)."""

    handler_class: type = _Handler

    def __init__(
        self,
        upstream: str,
        fail_rate: float = 0.2,
        *,
        seed: int = 0,
        burst_share: float = 0.0,
        burst_failures: int = 5,
        aliases: dict[str, str] | None = None,
        forced_bursts: list[tuple[str, str]] | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1":
            raise ValueError(f"upstream must be on 127.0.0.1, got {upstream}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.fail_rate = fail_rate
        self.seed = seed
        self.burst_share = burst_share
        self.burst_failures = burst_failures
        # Names replaced before hashing (e.g. a bucket named after the test's pid), so
        # the same objects meet the same failures in every session.
        self.aliases = dict(aliases or {})
        self.bursts_served: int = 0  # requests that got through after a whole burst
        # (method, substring): the first request matching each gets a burst, whatever the
        # hash says, so a test can count on e.g. one throttled read and one throttled write.
        self._unclaimed = list(forced_bursts or [])
        self._forced: dict[str, int] = {}
        self.forwarded: Counter = Counter()  # method -> requests passed to moto
        self.injected: Counter = Counter()  # method -> requests answered 503
        self.injected_kinds: Counter = Counter()  # "GET object", "GET bucket" (a listing), ...
        self._attempts: Counter = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FlakyS3Proxy:
        proxy = self

        class Handler(self.handler_class):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FlakyS3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """s3fs options that reach moto through this proxy."""
        opts: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }
        opts.update(extra)
        return opts

    # -- the decision ----------------------------------------------------------------------

    def _uniform(self, key: str, salt: str) -> float:
        digest = hashlib.sha256(f"{self.seed}|{salt}|{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _key(self, method: str, target: str) -> str:
        for name, alias in self.aliases.items():
            target = target.replace(name, alias)
        return f"{method} {target}"

    def failures_for(self, method: str, target: str) -> int:
        """How many attempts in a row this request fails (0 for most)."""
        key = self._key(method, target)
        if self._uniform(key, "fail") >= self.fail_rate:
            return 0
        return self.burst_failures if self._uniform(key, "burst") < self.burst_share else 1

    def should_fail(self, method: str, target: str) -> bool:
        key = self._key(method, target)
        with self._lock:
            attempt = self._attempts[key]
            self._attempts[key] += 1
            if attempt == 0:
                for pattern in self._unclaimed:
                    if pattern[0] == method and pattern[1] in target:
                        self._unclaimed.remove(pattern)
                        self._forced[key] = self.burst_failures
                        break
            failures = self._forced.get(key)
        if failures is None:
            failures = self.failures_for(method, target)
        if failures > 1 and attempt == failures:
            with self._lock:
                self.bursts_served += 1
        return attempt < failures

    def record(self, method: str, target: str, failed: bool) -> None:
        with self._lock:
            if failed:
                self.injected[method] += 1
                bucket_level = "/" not in urlsplit(target).path.strip("/")
                self.injected_kinds[f"{method} {'bucket' if bucket_level else 'object'}"] += 1
            else:
                self.forwarded[method] += 1
