"""Shared fixtures: a real S3 HTTP endpoint on 127.0.0.1 (moto's server) and one
store test suite parametrised over local disk, ``memory://`` and S3."""

from __future__ import annotations

import itertools
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
_counter = itertools.count()


@dataclass
class S3Endpoint:
    url: str
    bucket: str

    @property
    def options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }

    def env(self) -> dict[str, str]:
        """Environment through which the CLI reaches the endpoint (no secrets on argv)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": self.url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture(scope="session")
def s3() -> S3Endpoint:
    pytest.importorskip("s3fs", reason="s3fs is in the [s3] extra that `make test` installs")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    bucket = "forge-test"
    boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    yield S3Endpoint(url, bucket)
    server.stop()


@dataclass
class Target:
    kind: str
    url: str
    options: dict[str, Any] | None
    env: dict[str, str]

    def store(self):
        from forge_dist.storage import CheckpointStore

        return CheckpointStore(self.url, self.options)


@pytest.fixture(params=["local", "memory", "s3"])
def target(request, tmp_path) -> Target:
    kind = request.param
    if kind == "local":
        return Target(kind, str(tmp_path / "root"), None, {})
    if kind == "memory":
        return Target(kind, f"memory://forge-{uuid.uuid4().hex}/root", None, {})
    s3: S3Endpoint = request.getfixturevalue("s3")
    url = f"s3://{s3.bucket}/t{next(_counter)}-{uuid.uuid4().hex[:8]}"
    return Target(kind, url, s3.options, s3.env())


@pytest.fixture
def payload(tmp_path):
    """A small local folder of files to checkpoint."""
    src = tmp_path / "payload"
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "opt.bin").write_bytes(os.urandom(5_000))
    (src / "empty.txt").write_bytes(b"")
    return src


@pytest.fixture(params=["local", "s3"])
def cli_target(request, tmp_path):
    """Targets a separate CLI process can reach (memory:// lives in one process only)."""
    if request.param == "local":
        return Target("local", str(tmp_path / "root"), None, {})
    s3 = request.getfixturevalue("s3")
    url = f"s3://{s3.bucket}/cli-{os.urandom(4).hex()}"
    # The CLI gets its endpoint and keys from the environment, as a user's would.
    return Target("s3", url, s3.options, s3.env())
