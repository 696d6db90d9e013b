"""Shared fixtures.

``moto_s3``: one real S3-compatible HTTP server (moto) on 127.0.0.1 for the whole
test session, so that s3fs, boto3 and pyarrow are exercised over the wire exactly
as against S3 or MinIO. Tests isolate themselves by creating their own bucket::

    def test_x(moto_s3):
        bucket = moto_s3.new_bucket("imgs")
        moto_s3.boto3_client().put_object(Bucket=bucket, Key="a.jpg", Body=b"...")
        list_inputs(InputConfig(uris=[f"s3://{bucket}/**"],
                                storage_options=moto_s3.storage_options))

``moto_s3.pyarrow_filesystem()`` gives a ``pyarrow.fs.S3FileSystem`` on the same
server (for Ray Data / Parquet writers).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

_BUCKET_SEQ = itertools.count()


@dataclass
class MotoS3:
    """Handle on the session's moto server. Only ever 127.0.0.1."""

    host: str
    port: int
    _buckets: list[str] = field(default_factory=list)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs/fsspec options (as in a job config's ``storage_options``)."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def boto3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def pyarrow_filesystem(self) -> Any:
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            endpoint_override=f"{self.host}:{self.port}",
            scheme="http",
            region="us-east-1",
        )

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, empty bucket with a unique name and return its name."""
        name = f"{prefix.lower()[:40]}-{os.getpid()}-{next(_BUCKET_SEQ)}"
        self.boto3_client().create_bucket(Bucket=name)
        self._buckets.append(name)
        return name

    def put(self, bucket: str, key: str, body: bytes | str) -> str:
        """Upload one object and return its ``s3://`` URI."""
        data = body.encode() if isinstance(body, str) else body
        self.boto3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1 (free port) for the whole session; see module doc."""
    from moto.server import ThreadedMotoServer

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(var, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    try:
        yield MotoS3(host=host, port=port)
    finally:
        server.stop()
