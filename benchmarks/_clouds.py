"""The three clouds' local endpoints for the benchmarks, on 127.0.0.1, each in its own
process: moto's S3 server (``_s3.py``), Azurite and fake-gcs-server (started as the
tests start them, ``tests/emulators.py``). Each yields a :class:`Cloud`: the storage
options, a fsspec filesystem for the plain baselines, and the options that reach the
endpoint through another address (a faulty-network proxy in front of it)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
# gcsfs' default class asks a gRPC control plane that no emulator serves (60 s a call).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

NAMES = {
    "s3": "S3 (moto)",
    "az": "Azure Blob (Azurite)",
    "gs": "GCS (fake-gcs-server)",
}
CLIENTS = {"s3": "s3fs", "az": "adlfs", "gs": "gcsfs"}


@dataclass
class Cloud:
    kind: str
    bucket: str
    options: dict[str, Any]
    upstream: tuple[str, int]
    options_for: Callable[[str], dict[str, Any]]

    def url(self, name: str) -> str:
        return f"{self.kind}://{self.bucket}/{name}"

    def fs(self) -> Any:
        import fsspec

        return fsspec.filesystem(self.kind, **self.options)


@contextlib.contextmanager
def endpoint(kind: str, bucket: str = "bench") -> Iterator[Cloud]:
    import emulators

    if kind == "s3":
        from _s3 import s3_endpoint

        with s3_endpoint(bucket) as (options, upstream):
            url = options["client_kwargs"]["endpoint_url"]
            ep = emulators.S3Endpoint(url, bucket, key=options["key"])
            yield Cloud(kind, bucket, options, upstream, ep.options_for)
        return
    with tempfile.TemporaryDirectory(prefix=f"forge-bench-{kind}-") as logs:
        start, endpoint_class, make = emulators.KINDS[kind]
        server = start(Path(logs))
        try:
            ep = endpoint_class(server.url, bucket)
            make(ep)
            yield Cloud(kind, bucket, ep.options, ("127.0.0.1", server.port), ep.options_for)
        finally:
            server.stop()
