"""A real S3 HTTP endpoint on 127.0.0.1 for the benchmarks: moto's server in its own
process (in the benchmark's process it would share the interpreter lock with the
client's hashing threads), with one bucket."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def s3_endpoint(bucket: str = "bench") -> Iterator[tuple[dict[str, Any], tuple[str, int]]]:
    """``(storage options for s3fs and forge_dist, (host, port))``; stopped after."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # until the endpoint answers (bounded)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the local S3 endpoint (moto.server) did not start") from None
                time.sleep(0.1)
        creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", **creds).create_bucket(
            Bucket=bucket
        )
        options = {
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
            # moto joins a multipart object's parts in Python before it answers
            # CompleteMultipartUpload: at 2.4 GB that took past s3fs' 15 s read timeout
            # here, and moto answered the client's retries 500 (a part's buffer closed
            # under them). S3 itself keeps a long completion's connection alive.
            "config_kwargs": {"read_timeout": 600},
        }
        yield options, ("127.0.0.1", port)
    finally:
        server.terminate()
        server.wait(timeout=30)
