"""The object-store backend's S3 uploads: parts sent concurrently, the object whole or
absent, no multipart upload left behind (against moto's real HTTP endpoint)."""

from __future__ import annotations

import hashlib
import os
from urllib.parse import urlparse

import pytest
from faultproxy import FaultProxy

from forge_dist.storage import CheckpointStore
from forge_dist.storage.backends import s3 as s3io

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
    monkeypatch.setattr(s3io, "PART_BYTES", 5 * 1024 * 1024)
    monkeypatch.setattr(s3io, "PARTS_IN_FLIGHT", 2)


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


def test_commit_and_verify_make_no_request_a_plain_upload_and_read_would_not(s3):
    """Counted on the wire (a proxy in front of moto): a commit is one LIST of the step's
    prefix (bucket there, step not committed, no leftovers) and a PUT per file and the
    manifest; a verify is one LIST (the sizes) and a GET per object; committing does not
    list the root or read other steps' manifests."""
    target = urlparse(s3.url)
    proxy = FaultProxy((target.hostname, target.port), rate=0.0)
    try:
        options = {**s3.options, "client_kwargs": {**s3.options["client_kwargs"],
                                                   "endpoint_url": proxy.url}}  # fmt: skip
        store = CheckpointStore(f"s3://{s3.bucket}/count-{os.urandom(4).hex()}", options)
        files = {"a.bin": os.urandom(1 << 20), "b.bin": os.urandom(3 << 20), "c.json": b"{}"}
        for step in (1, 2, 3):  # later commits cost the same as the first
            proxy.methods.clear()
            with store.writer(step) as w:
                for name, data in files.items():
                    w.add_bytes(name, data)
            assert dict(proxy.methods) == {"GET": 1, "PUT": 4}, step
        proxy.methods.clear()
        assert store.verify(3).ok
        assert dict(proxy.methods) == {"GET": 5}
    finally:
        proxy.close()


def test_a_commit_into_a_missing_bucket_says_so(s3, tmp_path):
    from forge_dist.errors import StorageError

    src = tmp_path / "model.bin"
    src.write_bytes(b"x" * 100)
    store = CheckpointStore("s3://no-such-bucket-here/run", s3.options)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' of .* does not exist"):
        store.put(src, 1)


def test_a_large_object_reads_back_in_ranges_ahead_byte_for_byte(s3, tmp_path, monkeypatch):
    """A 5.5 MB file read in 1 MiB ranges (two ahead), each in 64 KiB chunks, comes back
    byte for byte: opened, downloaded and verified."""
    monkeypatch.setattr(s3io, "RANGE_BYTES", 1 << 20)
    monkeypatch.setattr(s3io, "READ_CHUNK", 64 << 10)
    store = CheckpointStore(f"s3://{s3.bucket}/ranges-{os.urandom(4).hex()}", s3.options)
    data = os.urandom(5_500_000)
    with store.writer(1) as w:
        w.add_bytes("model.bin", data)
    with store.open_file(1, "model.bin") as f:
        assert isinstance(f, s3io.RangeReader)
        assert f.read() == data
    dest = store.download(1, tmp_path / "dl")
    assert (tmp_path / "dl" / "model.bin").read_bytes() == data, dest
    assert store.verify(1).ok
