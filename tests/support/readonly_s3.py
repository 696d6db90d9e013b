"""A read-only bucket: the S3 proxy in front of moto that refuses every write to it.

What read-only credentials on a lake look like to a client: reads and listings
pass, and every ``PUT``, ``POST`` or ``DELETE`` on the bucket is answered
``403 AccessDenied`` (s3fs raises ``PermissionError``), as a bucket policy or an
IAM policy without ``s3:PutObject`` / ``s3:DeleteObject`` would. Other buckets
stay writable. Refused requests are counted, so a test can prove that a tool did
not even try to write::

    with ReadOnlyS3Proxy(moto_s3.endpoint_url, bucket="lake") as proxy:
        ... run the tool with proxy.storage_options() ...
        assert proxy.refused == Counter()
"""

from __future__ import annotations

import uuid
from collections import Counter
from urllib.parse import urlsplit

from tests.support.s3proxy import FlakyS3Proxy, _Handler

ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>{rid}</RequestId></Error>"
)
WRITES = ("PUT", "POST", "DELETE")


class _ReadOnlyHandler(_Handler):
    owner: ReadOnlyS3Proxy

    def _refuse_or_forward(self) -> None:
        proxy = self.owner
        if not proxy.denies(self.command, self.path):
            self._handle()
            return
        self._read_body()  # keep the connection in sync
        with proxy._lock:
            proxy.refused[f"{self.command} {urlsplit(self.path).path}"] += 1
        payload = ACCESS_DENIED.replace(b"{rid}", uuid.uuid4().hex.encode())
        self.send_response(403, "Forbidden")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _refuse_or_forward  # noqa: N815


class ReadOnlyS3Proxy(FlakyS3Proxy):
    """Forwards everything to moto except writes to ``bucket`` (see module doc)."""

    handler_class = _ReadOnlyHandler

    def __init__(self, upstream: str, *, bucket: str) -> None:
        super().__init__(upstream, fail_rate=0.0)
        self.bucket = bucket
        self.refused: Counter[str] = Counter()

    def denies(self, method: str, target: str) -> bool:
        path = urlsplit(target).path
        mine = path == f"/{self.bucket}" or path.startswith(f"/{self.bucket}/")
        return method in WRITES and mine
