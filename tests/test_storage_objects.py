"""The object-store backend's S3 uploads: parts sent concurrently, the object whole or
absent, no multipart upload left behind (against moto's real HTTP endpoint)."""

from __future__ import annotations

import hashlib
import os

import pytest

from forge_dist.storage import CheckpointStore
from forge_dist.storage.backends import objects

pytestmark = pytest.mark.s3


def client(s3):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture
def small_parts(monkeypatch):
    """5 MiB parts (S3's smallest), two in flight: a 23 MB file is five parts (one PUT
    below 10 MiB)."""
    monkeypatch.setattr(objects, "PART_BYTES", 5 * 1024 * 1024)
    monkeypatch.setattr(objects, "PARTS_IN_FLIGHT", 2)


def test_a_large_file_goes_up_in_concurrent_parts_and_reads_back_whole(s3, small_parts):
    prefix = f"parts-{os.urandom(4).hex()}"
    store = CheckpointStore(f"s3://{s3.bucket}/{prefix}", s3.options)
    data = os.urandom(23 * 1024 * 1024 + 123)
    with store.writer(1) as w, w.open("model.bin") as f:
        for i in range(0, len(data), 3 * 1024 * 1024):  # writes that straddle parts
            f.write(data[i : i + 3 * 1024 * 1024])
    obj = client(s3).get_object(Bucket=s3.bucket, Key=f"{prefix}/step-00000001/model.bin")
    assert obj["ContentLength"] == len(data)
    assert obj["ETag"].strip('"').endswith("-5")  # five parts (S3's multipart ETag)
    assert hashlib.sha256(obj["Body"].read()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert store.verify(1).ok


def test_a_failed_upload_leaves_no_object_and_no_open_multipart_upload(s3, small_parts):
    prefix = f"abort-{os.urandom(4).hex()}"
    store = CheckpointStore(f"s3://{s3.bucket}/{prefix}", s3.options)
    with (
        pytest.raises(RuntimeError, match="serializer"),
        store.writer(1) as w,
        w.open("model.bin") as f,
    ):
        f.write(os.urandom(12 * 1024 * 1024))  # two parts sent, one buffered
        raise RuntimeError("serializer crashed")
    c = client(s3)
    listed = c.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    assert listed.get("KeyCount", 0) == 0
    uploads = c.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == []
    assert store.list() == []


def test_a_file_smaller_than_a_part_is_one_put(s3, small_parts):
    prefix = f"one-{os.urandom(4).hex()}"
    store = CheckpointStore(f"s3://{s3.bucket}/{prefix}", s3.options)
    with store.writer(1) as w:
        w.add_bytes("small.bin", b"x" * 1000)
        w.add_bytes("empty.bin", b"")
    obj = client(s3).head_object(Bucket=s3.bucket, Key=f"{prefix}/step-00000001/small.bin")
    assert "-" not in obj["ETag"]  # a plain PUT's ETag, no part count
    assert store.verify(1).ok
