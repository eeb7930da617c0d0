"""A real S3 endpoint over HTTP for tests: moto's server on 127.0.0.1, one per test session.

Use the `s3_server` fixture (re-exported by conftest.py):
    def test_x(s3_server, monkeypatch):
        bucket = s3_server.new_bucket()
        s3_server.upload(bucket, local_path, "pt/shard-000000.tar")
        for k, v in s3_server.env.items(): monkeypatch.setenv(k, v)   # what a user would set
moto keeps objects in RAM: keep test data small. Buckets are created with a us-east-1 client
(moto refuses the R2 region "auto" as a location constraint); readers may use "auto".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class S3Server:
    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        """A us-east-1 client for setting up buckets and objects."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, bucket: str, path: str | Path, key: str) -> str:
        self.client().upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{key}"


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on a free loopback port for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    try:
        yield S3Server(url, env)
    finally:
        server.stop()
