"""Shared fixtures: real object-store HTTP endpoints on 127.0.0.1 (moto's S3 server,
Azurite, fake-gcs-server; see emulators.py) and one store test suite parametrised over
local disk, ``memory://``, S3, Azure Blob and GCS."""

from __future__ import annotations

import itertools
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import emulators
import pytest

# gcsfs' default class asks a gRPC control plane for every bucket's layout, with a 60 s
# timeout per call, which no emulator answers; the plain class speaks only the JSON API.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
_counter = itertools.count()


@pytest.fixture(scope="session")
def s3() -> emulators.S3Endpoint:
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
    yield emulators.S3Endpoint(url, bucket)
    server.stop()


def _emulated(tmp_path_factory, package: str, extra: str, kind: str):
    """A session's emulator of cloud ``kind`` (az, gs) with a bucket, stopped after."""
    pytest.importorskip(package, reason=f"{package} is in the [{extra}] extra `make test` installs")
    start, endpoint_class, make = emulators.KINDS[kind]
    server = start(tmp_path_factory.mktemp(kind))
    try:
        endpoint = endpoint_class(server.url, "forge-test")
        make(endpoint)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def az(tmp_path_factory):
    yield from _emulated(tmp_path_factory, "adlfs", "azure", "az")


@pytest.fixture(scope="session")
def gs(tmp_path_factory):
    yield from _emulated(tmp_path_factory, "gcsfs", "gcs", "gs")


CLOUDS = ("s3", "az", "gs")


@dataclass
class Target:
    kind: str
    url: str
    options: dict[str, Any] | None
    env: dict[str, str]

    def store(self):
        from forge_dist.storage import CheckpointStore

        return CheckpointStore(self.url, self.options)


def cloud_target(request, kind: str, prefix: str = "t") -> Target:
    """A fresh root on the local endpoint of cloud ``kind`` (s3, az, gs)."""
    endpoint = request.getfixturevalue(kind)
    url = f"{kind}://{endpoint.bucket}/{prefix}{next(_counter)}-{uuid.uuid4().hex[:8]}"
    return Target(kind, url, endpoint.options, endpoint.env())


@pytest.fixture(params=["local", "memory", *CLOUDS])
def target(request, tmp_path) -> Target:
    kind = request.param
    if kind == "local":
        return Target(kind, str(tmp_path / "root"), None, {})
    if kind == "memory":
        return Target(kind, f"memory://forge-{uuid.uuid4().hex}/root", None, {})
    return cloud_target(request, kind)


@pytest.fixture
def without_gcsfs(tmp_path, monkeypatch) -> dict[str, str]:
    """gcsfs as if it were not installed: hidden from this process's imports and, through
    the environment returned, from a child's (first on PYTHONPATH, a gcsfs whose import
    fails as a missing package's does)."""
    import fsspec.registry  # noqa: F401 (the module, not fsspec's attribute of that name)

    registry = sys.modules["fsspec.registry"]._registry
    hide = tmp_path / "hide" / "gcsfs"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'gcsfs'\")\n")
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    for protocol in ("gs", "gcs"):
        if protocol in registry:
            monkeypatch.delitem(registry, protocol)
    path = [str(hide.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


@pytest.fixture
def payload(tmp_path):
    """A small local folder of files to checkpoint."""
    src = tmp_path / "payload"
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "opt.bin").write_bytes(os.urandom(5_000))
    (src / "empty.txt").write_bytes(b"")
    return src


@pytest.fixture(params=["local", *CLOUDS])
def cli_target(request, tmp_path):
    """Targets a separate CLI process can reach (memory:// lives in one process only).
    The CLI gets its endpoint and keys from the environment, as a user's would."""
    if request.param == "local":
        return Target("local", str(tmp_path / "root"), None, {})
    return cloud_target(request, request.param, "cli-")
