"""The object-store backend's S3 uploads: parts sent concurrently, the object whole or
absent, no multipart upload left behind (against moto's real HTTP endpoint)."""

from __future__ import annotations

import hashlib
import io
import os
from urllib.parse import urlparse

import pytest
from faultproxy import FaultProxy

from forge_dist.errors import StorageError
from forge_dist.storage import CheckpointStore
from forge_dist.storage.backends import s3wire as s3io

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


def _stored_sha256(s3, key: str) -> str | None:
    """The sha256 S3 recorded for an object from its upload's checksum header (hex)."""
    import base64

    head = client(s3).head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
    value = head.get("ChecksumSHA256")
    return None if value is None else base64.b64decode(value).hex()


def test_a_whole_file_goes_up_with_the_manifest_sha256_for_s3_to_check(s3, tmp_path):
    """Each file sent in one PUT carries its manifest sha256 as x-amz-checksum-sha256
    (S3 refuses a body that does not match it): a local file, a stream, and a file a
    serializer wrote through ``open``."""
    prefix = f"sum-{os.urandom(4).hex()}"
    store = CheckpointStore(f"s3://{s3.bucket}/{prefix}", s3.options)
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(3 << 20))
    with store.writer(1) as w:
        w.add_file("weights.bin", src)
        w.add_bytes("state.json", b'{"epoch": 3}')
        with w.open("model.keras") as f:
            f.write(os.urandom(1 << 20))
            f.write(b"tail")
    manifest = store.get(1).manifest
    assert manifest is not None
    for entry in manifest.files:
        key = f"{prefix}/step-00000001/{entry.path}"
        assert _stored_sha256(s3, key) == entry.sha256, entry.path
    assert store.verify(1).ok


def _headers(head: str) -> dict[str, str]:
    lines = head.split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}


def test_on_the_wire_a_file_carries_only_its_sha256_and_reads_ask_for_no_checksum(s3):
    """Through a proxy that records the requests: a whole file's PUT carries the
    manifest's sha256 and no CRC-32 of botocore's; the store's GETs do not ask S3 for
    a stored checksum to check again (the store hashes every byte against the
    manifest); options that choose botocore's response check keep it."""
    target = urlparse(s3.url)
    proxy = FaultProxy((target.hostname, target.port), rate=0.0)
    try:
        endpoint = {**s3.options["client_kwargs"], "endpoint_url": proxy.url}
        root = f"s3://{s3.bucket}/wire-{os.urandom(4).hex()}"
        store = CheckpointStore(root, {**s3.options, "client_kwargs": endpoint})
        with store.writer(1) as w:
            w.add_bytes("model.bin", os.urandom(1 << 20))
        puts = [_headers(h) for h in proxy.heads if h.startswith("PUT ") and "model.bin" in h]
        assert len(puts) == 1
        assert "x-amz-checksum-sha256" in puts[0] and "x-amz-checksum-crc32" not in puts[0]
        proxy.heads.clear()
        assert store.verify(1).ok
        gets = [_headers(h) for h in proxy.heads if h.startswith("GET ") and "model.bin" in h]
        assert len(gets) == 1 and "x-amz-checksum-mode" not in gets[0]

        chosen = {"response_checksum_validation": "when_supported"}
        store = CheckpointStore(
            root, {**s3.options, "client_kwargs": endpoint, "config_kwargs": chosen}
        )
        proxy.heads.clear()
        assert store.verify(1).ok
        gets = [_headers(h) for h in proxy.heads if h.startswith("GET ") and "model.bin" in h]
        assert gets[0].get("x-amz-checksum-mode") == "ENABLED"
    finally:
        proxy.close()


def test_an_endpoint_configured_without_checksums_gets_no_checksum_header(s3, tmp_path):
    """``request_checksum_calculation="when_required"`` (for endpoints that refuse S3's
    checksum headers): the commit adds none of its own and still verifies."""
    prefix = f"nosum-{os.urandom(4).hex()}"
    options = {**s3.options, "config_kwargs": {"request_checksum_calculation": "when_required"}}
    store = CheckpointStore(f"s3://{s3.bucket}/{prefix}", options)
    with store.writer(1) as w:
        w.add_bytes("state.json", b'{"epoch": 3}')
    assert _stored_sha256(s3, f"{prefix}/step-00000001/state.json") is None
    assert store.verify(1).ok


def test_a_whole_file_handed_over_as_bytes_is_kept_not_copied():
    """What a one-PUT file costs the writer: a ``bytes`` handed over is the body sent;
    a view of a reused buffer is copied (it changes after the call)."""
    sink = s3io.PartsSink(object(), "bucket/key")
    data = os.urandom(1000)
    sink.write(data)
    assert sink._whole is data
    sink.write(memoryview(b"more"))
    assert sink._whole is None and bytes(sink._buf) == data + b"more"


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


@pytest.mark.parametrize("kind", ["az", "gs"])
def test_a_commit_of_a_new_step_lists_only_the_root_before_its_uploads(kind, request):
    """Counted on the wire (a proxy in front of the emulator): before the first byte of
    a new step goes out, only the root's listing (the bucket is there, the step has no
    object), no read of the step's manifest or listing of its prefix; then an upload per
    file and the manifest. A step the listing shows is looked into: what a dead writer
    left under its prefix is removed before the step is written."""
    from urllib.parse import urlparse

    cloud = request.getfixturevalue(kind)
    target = urlparse(cloud.url)
    proxy = FaultProxy((target.hostname, target.port), rate=0.0)
    root = f"{cloud.bucket}/count-{os.urandom(4).hex()}"
    try:
        store = CheckpointStore(f"{kind}://{root}", cloud.options_for(proxy.url))
        for step in (1, 2):
            proxy.heads.clear()
            with store.writer(step) as w:
                w.add_bytes("a.bin", os.urandom(1 << 20))
                w.add_bytes("b.json", b"{}")
        asked = [h.split("\r\n")[0] for h in proxy.heads]
    finally:
        proxy.close()
    first = next(i for i, a in enumerate(asked) if a.startswith(("PUT", "POST")))
    assert first >= 1 and all(a.startswith("GET") for a in asked[:first]), asked
    assert all(f"prefix={root.split('/', 1)[1]}" in a for a in asked[:first]), asked
    assert not any("step-00000002" in a for a in asked[:first]), asked
    assert len(asked) - first == 3, asked  # a.bin, b.json, manifest.json
    store = CheckpointStore(f"{kind}://{root}", cloud.options)
    store._backend.fs.pipe_file(f"{root}/step-00000003/left.bin", b"a dead writer's file")
    with store.writer(3) as w:
        w.add_bytes("a.bin", b"3")
    assert store.verify(3, strict=True).ok, "the dead writer's file was left in the step"


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


def test_each_protocol_gets_its_backend_from_the_one_table(s3, az, gs, tmp_path):
    """Each cloud gets its own backend (conditional lease writes), a protocol with no
    entry the generic ObjectBackend (plain lease writes), a local path the POSIX one."""
    from forge_dist.storage.backends import (
        PROTOCOLS,
        ObjectBackend,
        PosixBackend,
        make_backend,
    )
    from forge_dist.storage.backends.azure import AzureBackend
    from forge_dist.storage.backends.gcs import GCSBackend
    from forge_dist.storage.backends.s3 import S3Backend

    for endpoint, cls in ((s3, S3Backend), (az, AzureBackend), (gs, GCSBackend)):
        url = f"{endpoint.kind}://{endpoint.bucket}/t"
        b = make_backend(url, endpoint.options, endpoint.kind)
        assert type(b) is cls and b.conditional_writes
    m = make_backend("memory://table/t", None, "memory")
    assert type(m) is ObjectBackend and not m.conditional_writes
    assert type(make_backend(str(tmp_path), None, "local")) is PosixBackend
    assert PROTOCOLS["s3a"] is PROTOCOLS["s3"]
    assert PROTOCOLS["abfs"] is PROTOCOLS["az"] and PROTOCOLS["gcs"] is PROTOCOLS["gs"]
    assert PROTOCOLS["gs"].extra == "gcs" and PROTOCOLS["az"].extra == "azure"


def test_a_missing_fsspec_implementation_names_its_extra(without_gcsfs):
    from forge_dist.errors import BackendNotInstalledError
    from forge_dist.storage.backends import make_backend

    with pytest.raises(BackendNotInstalledError, match=r"pip install 'forge-dist\[gcs\]'"):
        make_backend("gs://bucket/t", None, "gs")


def test_a_discarded_generic_sink_leaves_nothing_behind():
    """A file refused before it became visible (a stale writer's, at its fence) never
    reaches the store: the generic sink holds it until it outgrows one request."""
    import gc

    import fsspec

    from forge_dist.storage.backends.objects import _FsspecSink

    fs = fsspec.filesystem("memory")
    path = f"/discard-{os.urandom(4).hex()}/f"
    sink = _FsspecSink(fs, path)
    sink.write(b"x" * 1000)
    sink.discard()
    del sink
    gc.collect()
    assert not fs.exists(path)


@pytest.mark.parametrize("kind", ["az", "gs"])
def test_an_object_of_several_ranges_reads_back_with_ranges_ahead(kind, request, monkeypatch):
    """Azure and GCS objects are read in ranges requested ahead of the reader; a file of
    several ranges (and a partial last one) comes back byte for byte, through
    ``readinto`` and through ``chunks`` (what hashing uses), and verifies."""
    from conftest import cloud_target

    from forge_dist.storage.backends import objects

    monkeypatch.setattr(objects, "RANGE_BYTES", 100_000)
    t = cloud_target(request, kind, "ranges-")
    store = t.store()
    data = os.urandom(350_001)
    with store.writer(1) as w:
        w.add_bytes("big.bin", data)
    reader = store._backend.open_read("step-00000001", "big.bin")
    assert isinstance(reader, objects.AheadReader)
    with io.BufferedReader(reader) as f:
        assert f.read() == data
    # Hashing takes the fetched ranges' own bytes, in pieces of at most the size asked.
    with store._backend.open_read("step-00000001", "big.bin") as reader:
        pieces = list(reader.chunks(30_000))
    assert b"".join(pieces) == data and max(map(len, pieces)) == 30_000
    assert store.verify(1).ok


@pytest.mark.parametrize("kind", ["az", "gs"])
def test_a_range_whose_body_breaks_off_is_fetched_again(kind, request, monkeypatch):
    """Azure's and GCS' readers send their own ranged GETs and keep the bodies as they
    arrive: a range whose body is cut short is fetched again (Azure's client retries a
    request that got no answer, not a body cut short; gcsfs' retries, both); one cut
    short every time is one clear error."""
    from urllib.parse import urlparse

    from forge_dist.errors import ForgeDistError
    from forge_dist.storage.backends import azure, gcs, objects

    monkeypatch.setattr(objects, "RANGE_BYTES", 100_000)
    cloud = request.getfixturevalue(kind)
    reader_class, tries = {
        "az": (azure.BlobRangeReader, azure.BODY_TRIES),
        "gs": (gcs.MediaRangeReader, 3),
    }[kind]
    root = f"{kind}://{cloud.bucket}/cut-{os.urandom(4).hex()}"
    data = os.urandom(350_001)
    with CheckpointStore(root, cloud.options).writer(1) as w:
        w.add_bytes("big.bin", data)
    target = urlparse(cloud.url)
    for rate in (0.0, 1.0):  # the first body cut short, or every one
        script = ("truncate",) if rate == 0.0 else ()
        proxy = FaultProxy(
            (target.hostname, target.port), rate, faults=("truncate",), script=script
        )
        try:
            store = CheckpointStore(root, cloud.options_for(proxy.url, attempts=0))
            backend = store._backend
            if kind == "gs":  # gcsfs' tries (its class's 6 would wait 31 s)
                monkeypatch.setattr(backend.fs, "retries", tries, raising=False)
            assert backend.reader is reader_class
            # (made here, not by open_read: the object's size is known, so the ranges are
            # the only requests, and the first one the proxy sees is the first range)
            path = backend._p("step-00000001", "big.bin")
            with reader_class(backend.fs, path, len(data)) as reader:
                if rate == 0.0:
                    assert b"".join(reader.chunks(1 << 20)) == data
                    assert proxy.counts["truncate"] == 1
                    assert "range: bytes=" in proxy.heads[0].lower(), proxy.heads
                else:
                    with pytest.raises(ForgeDistError, match="cannot read .*big.bin") as err:
                        b"".join(reader.chunks(1 << 20))
                    assert len(str(err.value).splitlines()) == 1
                    # (more than the ranges in flight: one range was tried again)
                    assert proxy.counts["truncate"] >= tries > objects.RANGES_AHEAD
        finally:
            proxy.close()


def test_gcs_uploads_each_held_file_in_one_request_as_gcsfs_asks(gs):
    """A file below the held size goes out in one multipart upload, also from 50 MiB on
    (where gcsfs' ``pipe_file`` turns to a resumable upload of several requests), with
    gcsfs' query parameters (``userProject``); bytes that look like a multipart boundary
    (gcsfs' own, ours) stay in the file."""
    from urllib.parse import urlparse

    from forge_dist.storage.backends import gcs

    root = f"gs://{gs.bucket}/up-{os.urandom(4).hex()}"
    files = {
        "large.bin": os.urandom(50 << 20),
        "tricky.bin": b"a\n--==0==\r\n--==0==\r\n--forge-dist-\r\n--forge-dist---\r\n" * 999,
    }
    target = urlparse(gs.url)
    proxy = FaultProxy((target.hostname, target.port), 0.0)
    try:
        options = {**gs.options_for(proxy.url), "requester_pays": "payer-project"}
        with CheckpointStore(root, options).writer(1) as w:
            for name, data in files.items():
                w.add_bytes(name, data)
        heads = [h for h in proxy.heads if "/upload/" in h]
        uploads = [h.split("\r\n")[0] for h in heads]
        boundaries = {h.split("boundary=", 1)[1].split("\r\n")[0] for h in heads}
        # Asked to check its uploads (md5, crc32c), gcsfs writes them itself.
        checked = CheckpointStore(root, {**options, "consistency": "md5"})._backend
        assert isinstance(checked.open_write("step-00000002", "x"), gcs.MultipartSink) is False
    finally:
        proxy.close()
    assert len(boundaries) == len(heads), "each upload has its own boundary"
    assert len(uploads) == len(files) + 1, uploads  # each file, then the manifest
    assert all(u.startswith("POST ") and "uploadType=multipart" in u for u in uploads), uploads
    assert all("userProject=payer-project" in u for u in uploads), uploads
    store = CheckpointStore(root, gs.options)
    assert store.verify(1).ok
    for name, data in files.items():
        with store.open_file(1, name) as f:
            assert f.read() == data, name


def test_gcs_range_reads_ask_as_gcsfs_asks(gs, monkeypatch):
    """GCS' reader sends its ranged GETs itself: with gcsfs' query parameters (a
    requester-pays bucket's ``userProject``, without which GCS refuses every read), and
    an answer that is not the range asked for is one clear error, not retried."""
    from urllib.parse import urlparse

    from forge_dist.errors import ForgeDistError
    from forge_dist.storage.backends import gcs, objects

    monkeypatch.setattr(objects, "RANGE_BYTES", 100_000)
    root = f"gs://{gs.bucket}/ask-{os.urandom(4).hex()}"
    data = os.urandom(250_001)
    with CheckpointStore(root, gs.options).writer(1) as w:
        w.add_bytes("big.bin", data)
    target = urlparse(gs.url)
    proxy = FaultProxy((target.hostname, target.port), 0.0)
    try:
        options = {**gs.options_for(proxy.url), "requester_pays": "payer-project"}
        backend = CheckpointStore(root, options)._backend
        path = backend._p("step-00000001", "big.bin")
        with gcs.MediaRangeReader(backend.fs, path, len(data)) as reader:
            assert b"".join(reader.chunks(1 << 20)) == data
        ranges = [h for h in proxy.heads if "range: bytes=" in h.lower()]
        assert len(ranges) == 3
        assert all("userProject=payer-project" in h.split("\r\n")[0] for h in ranges), ranges
        # A server that ignores the range answers the whole object (here: no Range
        # header goes out): right where the range was the whole object, else refused at
        # once, with no second request.
        monkeypatch.setattr(objects, "RANGE_BYTES", 1 << 30)
        headers = backend.fs._get_headers
        monkeypatch.setattr(
            backend.fs,
            "_get_headers",
            lambda h, **kw: {k: v for k, v in headers(h, **kw).items() if k != "Range"},
        )
        with gcs.MediaRangeReader(backend.fs, path, len(data)) as reader:
            assert b"".join(reader.chunks(1 << 20)) == data
        before = proxy.counts["requests"]
        reader = gcs.MediaRangeReader(backend.fs, path, len(data) - 1)
        with reader, pytest.raises(ForgeDistError, match="bytes 0-249999 asked, 200 with") as e:
            b"".join(reader.chunks(1 << 20))
        assert len(str(e.value).splitlines()) == 1
        assert proxy.counts["requests"] == before + 1
    finally:
        proxy.close()


@pytest.mark.parametrize("kind", ["az", "gs"])
def test_files_around_the_one_request_size_commit_whole_and_a_discarded_one_leaves_nothing(
    kind, request, monkeypatch
):
    """Below the generic sink's one-request size a file is held and sent whole; at and
    above it, it streams through the client's file object. Each reads back byte for
    byte; a streaming file discarded before its end leaves no object."""
    from conftest import cloud_target

    from forge_dist.storage.backends import objects

    monkeypatch.setattr(objects._FsspecSink, "whole_below", 50_000)
    t = cloud_target(request, kind, "sink-")
    store = t.store()
    files = {
        name: os.urandom(n) for name, n in (("held", 49_999), ("at", 50_000), ("big", 120_001))
    }
    with store.writer(1) as w:
        for name, data in files.items():
            w.add_bytes(name, data)
    assert store.verify(1).ok
    for name, data in files.items():
        with store.open_file(1, name) as f:
            assert f.read() == data, name
    backend = store._backend
    sink = backend.open_write("step-00000002", "partial")
    sink.write(os.urandom(120_000))
    assert sink.f is not None  # past the held size: streaming through the client's file
    sink.discard()
    assert not backend.fs.exists(backend._p("step-00000002", "partial"))


@pytest.fixture
def lost_answer(monkeypatch):
    """A store whose manifest write lands but answers with a reset connection (the
    response lost on the way back); ``reads_failing`` reads of the manifest after it
    fail as well."""
    from forge_dist.storage.manifest import MANIFEST_NAME

    store = CheckpointStore(f"memory://lost-{os.urandom(4).hex()}")
    backend = store._backend
    state = {"landed": False, "reads_failing": 0}
    pipe, get_small = backend.fs.pipe_file, backend._get_small

    def pipe_file(path, data, **kw):
        pipe(path, data, **kw)
        if path.endswith(MANIFEST_NAME):
            state["landed"] = True
            raise ConnectionResetError(104, "Connection reset by peer")

    def read(path, limit):
        if state["landed"] and state["reads_failing"] > 0:
            state["reads_failing"] -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return get_small(path, limit)

    monkeypatch.setattr(backend.fs, "pipe_file", pipe_file)
    monkeypatch.setattr(backend, "_get_small", read)
    return store, state


def test_a_manifest_that_landed_though_its_answer_was_lost_is_a_commit(lost_answer):
    """The manifest's write failed on the way back, not on the way in: the manifest
    there is this writer's own, byte for byte, so the save succeeded (and says so)."""
    store, _ = lost_answer
    with store.writer(1) as w:
        w.add_bytes("model.bin", b"weights")
    assert w.committed is not None
    assert store.steps() == [1]
    assert store.verify(1).ok


def test_a_save_reported_failed_leaves_no_step_even_when_its_manifest_landed(lost_answer):
    """The write's answer lost and the manifest unreadable right after: the save fails,
    and the step it did leave behind is removed, so a failed save is never a step that
    readers trust."""
    store, state = lost_answer
    state["reads_failing"] = 3  # every read-back of the commit's own
    with pytest.raises(StorageError, match="cannot write the manifest"), store.writer(1) as w:
        w.add_bytes("model.bin", b"weights")
    assert store.steps() == []
    assert not store._backend.fs.exists(store._backend._p("step-00000001"))
