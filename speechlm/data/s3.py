"""S3 / Cloudflare R2 access for data preparation: a configured boto3 client, listing, and a
read stream that survives a connection broken mid-object.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or a
profile from --profile / AWS_PROFILE); the endpoint from the argument, R2_ENDPOINT_URL or
AWS_ENDPOINT_URL. Nothing here logs a key: `describe()` names the endpoint and profile only.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_mode: str = "adaptive"

    @classmethod
    def from_env(cls, profile: str | None = None, endpoint_url: str | None = None, **kw: Any) -> "S3Settings":
        endpoint = endpoint_url or os.environ.get("R2_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(endpoint_url=endpoint, profile=profile or os.environ.get("AWS_PROFILE") or None, **kw)

    def describe(self) -> str:
        """For logs: endpoint and profile, never credentials."""
        return f"endpoint={self.endpoint_url or 'AWS default'} profile={self.profile or '-'}"


def make_client(settings: S3Settings | None = None):
    """A boto3 S3 client: retries with backoff, path-style addressing, region "auto" for R2.

    Path-style addressing works with R2 and is what moto (the test stand-in) needs; "auto" is
    the region R2 expects, used whenever a custom endpoint is set and no region is given.
    """
    import boto3
    from botocore.config import Config

    s = settings or S3Settings.from_env()
    region = s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and s.endpoint_url:
        region = "auto"
    session = boto3.session.Session(profile_name=s.profile) if s.profile else boto3.session.Session()
    config = Config(
        retries={"mode": s.retry_mode, "max_attempts": s.max_attempts},
        s3={"addressing_style": "path"},
        connect_timeout=20,
        read_timeout=60,
        region_name=region,
    )
    return session.client("s3", endpoint_url=s.endpoint_url, config=config)


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url}")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url}")
    return bucket, key


def list_keys(client, bucket: str, prefix: str) -> Iterator[str]:
    """Every key under prefix (all pages)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            yield obj["Key"]


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors of a body read that a fresh ranged GET can cure."""
    from botocore import exceptions as be
    from urllib3 import exceptions as ue

    return (
        be.ReadTimeoutError,
        be.ConnectTimeoutError,
        be.EndpointConnectionError,
        be.ConnectionClosedError,
        be.ResponseStreamingError,
        be.IncompleteReadError,
        ue.ProtocolError,
        ue.ReadTimeoutError,
        ConnectionError,
        TimeoutError,
    )


class ObjectChangedError(IOError):
    """The object changed (another ETag) while we were reading it: resuming would mix versions."""


class ResumableBody(io.RawIOBase):
    """A read-only stream over one S3 object that resumes a broken transfer.

    `read(n)` reads the current response body; when the connection breaks (or the body ends
    before Content-Length) it waits with exponential backoff and issues a new GET with
    `Range: bytes=<bytes received>-` and `If-Match: <ETag>`, so the bytes handed out are exactly
    the object's bytes, once each. The client's own retry config covers the GET requests.
    """

    def __init__(self, client, bucket: str, key: str, max_resumes: int = DEFAULT_MAX_ATTEMPTS, backoff: float = 0.5):
        super().__init__()
        self.client, self.bucket, self.key = client, bucket, key
        self.max_resumes, self.backoff = max_resumes, backoff
        self.pos = 0
        self.resumes = 0
        self._errors = _transient_errors()
        resp = client.get_object(Bucket=bucket, Key=key)
        self.size = int(resp["ContentLength"])
        self.etag = resp.get("ETag")
        self._body = resp["Body"]

    def readable(self) -> bool:
        return True

    def _reopen(self, why: BaseException | str) -> None:
        self.resumes += 1
        if self.resumes > self.max_resumes:
            raise IOError(f"s3://{self.bucket}/{self.key}: gave up after {self.max_resumes} resumes: {why}")
        delay = self.backoff * 2 ** (self.resumes - 1) * (0.5 + random.random())
        log.warning("s3://%s/%s: stream broke at byte %d (%s); resuming in %.1f s", self.bucket, self.key, self.pos, why, delay)
        time.sleep(min(delay, 30.0))
        try:
            self._body.close()
        except Exception:  # the old connection is already broken; nothing to clean up
            pass
        extra = {"IfMatch": self.etag} if self.etag else {}
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-", **extra)
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412"):
                raise ObjectChangedError(f"s3://{self.bucket}/{self.key} changed while being read") from e
            raise
        self._body = resp["Body"]

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = min(n, self.size - self.pos)
        if n <= 0:
            return b""
        while True:
            try:
                data = self._body.read(n)
            except self._errors as e:
                self._reopen(e)
                continue
            if not data:  # body ended before Content-Length: the connection was cut
                self._reopen("body ended early")
                continue
            self.pos += len(data)
            return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()
