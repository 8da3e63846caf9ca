"""Payload files written and read back around the page cache (O_DIRECT), and the
ordinary writes and reads they fall back to. The tests' directories are on ext4 here,
which enforces O_DIRECT's alignment (a misaligned direct write fails with EINVAL), so a
file that stays direct to the end and reads back right was written with aligned writes
only."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import pytest

from forge_dist.errors import IntegrityError, StorageError
from forge_dist.storage import CheckpointStore
from forge_dist.storage.backends import direct
from forge_dist.storage.backends.posix import _PosixSink

pytestmark = pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="Linux O_DIRECT")

B = direct.BUFFER_BYTES


def resident_pages(path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), from Linux ``mincore``."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # maps, reads nothing
    try:
        anchor = ctypes.c_char.from_buffer(mm)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec):
            raise OSError(ctypes.get_errno(), "mincore")
        del anchor
        return sum(v & 1 for v in vec), pages
    finally:
        mm.close()


def _flags(sink: _PosixSink) -> int:
    assert sink.fd is not None
    return fcntl.fcntl(sink.fd, fcntl.F_GETFL)


@pytest.mark.parametrize(
    "sizes",
    [
        [0],
        [1],
        [direct.ALIGN - 1],
        [direct.ALIGN],
        [direct.ALIGN + 1],
        [B - 1],
        [B],
        [B + 1],
        [3, B - 2, 7, 2 * B + 5, 4096, 1],  # pieces across buffer boundaries
        [2 * B + direct.ALIGN],  # ends aligned: no buffered tail
    ],
)
def test_direct_file_holds_exactly_what_was_written(tmp_path, sizes):
    data = [os.urandom(n) for n in sizes]
    path = tmp_path / "f.bin"
    sink = _PosixSink(str(path), direct=True)
    writer = sink._direct
    assert writer is not None, "ext4 takes O_DIRECT at open"
    assert _flags(sink) & os.O_DIRECT
    for d in data:
        sink.write(memoryview(d))
    assert writer.direct, "a direct write was refused: a write was misaligned"
    sink.close()
    assert path.read_bytes() == b"".join(data)


@pytest.mark.parametrize("on", ["1", "0"])
def test_a_checkpoint_written_directly_stays_out_of_the_page_cache(tmp_path, monkeypatch, on):
    monkeypatch.setenv("FORGE_DIST_DIRECT_IO", on)
    payload = os.urandom(3 * B + 123)
    store = CheckpointStore(str(tmp_path / "root"))
    with store.writer(1) as w, w.open("model.keras") as f:
        for i in range(0, len(payload), 1 << 20):
            f.write(payload[i : i + (1 << 20)])
    path = tmp_path / "root" / "step-00000001" / "model.keras"
    cached, pages = resident_pages(path)
    if on == "1":
        assert cached <= 1, f"{cached} of {pages} pages went through the page cache"  # the tail
    else:
        assert cached > pages // 2  # the check sees what a buffered write leaves
    assert store.verify(1, strict=True).ok
    manifest = store.get(1).manifest
    assert manifest is not None
    (entry,) = manifest.files
    assert entry.sha256 == hashlib.sha256(payload).hexdigest()
    assert path.read_bytes() == payload


def test_the_staging_buffer_is_reused_by_the_next_file_and_after_a_discard(tmp_path):
    first = _PosixSink(str(tmp_path / "a"), direct=True)
    assert first._direct is not None
    buf = first._direct._buf
    first.write(b"a" * 10)
    first.close()
    second = _PosixSink(str(tmp_path / "b"), direct=True)
    assert second._direct is not None and second._direct._buf is buf
    second.write(b"b" * (B + 3))
    second.discard()
    third = _PosixSink(str(tmp_path / "c"), direct=True)
    assert third._direct is not None and third._direct._buf is buf
    third.close()


def test_off_by_environment_writes_through_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_DIST_DIRECT_IO", "0")
    sink = _PosixSink(str(tmp_path / "f"), direct=True)
    assert sink._direct is None and not _flags(sink) & os.O_DIRECT
    sink.write(b"z" * (B + 1))
    sink.close()
    assert (tmp_path / "f").read_bytes() == b"z" * (B + 1)


def test_a_filesystem_refusing_o_direct_at_open_gets_ordinary_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # tmpfs before Linux 6.6, FUSE
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct.os, "open", no_direct)
    store = CheckpointStore(str(tmp_path / "root"))
    payload = os.urandom(B + 5)
    with store.writer(1) as w:
        w.add_bytes("model.keras", payload)
    monkeypatch.undo()
    assert store.verify(1, strict=True).ok
    assert (tmp_path / "root" / "step-00000001" / "model.keras").read_bytes() == payload


def test_a_filesystem_refusing_direct_writes_gets_the_same_bytes_buffered(tmp_path, monkeypatch):
    real_write = os.write
    refused = []

    def refuse_direct(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct.os, "write", refuse_direct)
    payload = os.urandom(2 * B + 77)
    path = tmp_path / "f.bin"
    sink = _PosixSink(str(path), direct=True)
    sink.write(payload[:5])
    sink.write(payload[5:])
    assert sink._direct is not None and not sink._direct.direct
    sink.close()
    monkeypatch.undo()
    assert refused == [B]  # one refusal, then the descriptor is buffered
    assert path.read_bytes() == payload


def test_other_errors_of_a_direct_write_are_storage_errors_and_keep_the_last_step(
    tmp_path, monkeypatch
):
    store = CheckpointStore(str(tmp_path / "root"))
    with store.writer(1) as w:
        w.add_bytes("model.keras", b"previous")

    def io_error(fd, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(direct.os, "write", io_error)
    with pytest.raises(StorageError, match="Input/output error"), store.writer(2) as w:
        w.add_bytes("model.keras", os.urandom(B + 1))
    monkeypatch.undo()
    assert store.steps() == [1]
    assert store.verify(1, strict=True).ok
    assert store.list_staging() == []


def cold(path) -> None:
    """``path`` written out and dropped from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert resident_pages(path)[0] == 0


@pytest.mark.parametrize("size", [1, 4096, 3 * B, 3 * B + 123])
@pytest.mark.parametrize("how", ["direct", "FORGE_DIST_DIRECT_IO=0", "direct=False"])
def test_a_verified_read_of_a_cold_step_stays_out_of_the_page_cache(
    tmp_path, monkeypatch, how, size
):
    """The restore's one read of a step's file goes around the page cache (whose fresh
    pages cost what a direct write saves); only the check for a byte past the manifest's
    size reads a page through it. Off by the environment, or for ranks reading the file
    at once (``direct=False``: a host's ranks then share one read), through it."""
    store = CheckpointStore(str(tmp_path / "root"))
    payload = os.urandom(size)
    with store.writer(1) as w:
        w.add_bytes("model.keras", payload)
    path = tmp_path / "root" / "step-00000001" / "model.keras"
    cold(path)
    monkeypatch.setenv("FORGE_DIST_DIRECT_IO", "0" if how.endswith("=0") else "1")
    assert store.read_verified(1, "model.keras", direct=how != "direct=False") == payload
    cached, pages = resident_pages(path)
    if how == "direct":
        assert cached <= 1, f"{cached} of {pages} pages went through the page cache"
    else:
        assert cached > pages // 2  # the check sees what a buffered read leaves


@pytest.mark.parametrize("where", ["open", "read"])
def test_a_filesystem_refusing_direct_reads_gets_the_same_bytes_buffered(
    tmp_path, monkeypatch, where
):
    """Refused at open (tmpfs before Linux 6.6, FUSE) or at a read: every byte still
    comes back once, in order, and hashed."""
    monkeypatch.setenv("FORGE_DIST_DIRECT_IO", "1")
    store = CheckpointStore(str(tmp_path / "root"))
    payload = os.urandom(3 * B + 4097)
    with store.writer(1) as w:
        w.add_bytes("model.keras", payload)
    real_open, real_preadv = os.open, os.preadv
    refused: list[int] = []

    def no_direct_open(path, flags, *a):
        if flags & os.O_DIRECT:
            refused.append(0)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def no_direct_read(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    if where == "open":
        monkeypatch.setattr(direct.os, "open", no_direct_open)
    else:
        monkeypatch.setattr(os, "preadv", no_direct_read)
    assert store.read_verified(1, "model.keras") == payload
    assert refused, "a direct open or read was tried"


def test_a_direct_read_of_a_file_other_than_its_manifest_says_is_caught(tmp_path, monkeypatch):
    """Longer (the bytes past the manifest's size, in the padding of the last direct
    read, are not taken as the file's) or shorter than its manifest: corrupt."""
    monkeypatch.setenv("FORGE_DIST_DIRECT_IO", "1")
    store = CheckpointStore(str(tmp_path / "root"))
    payload = os.urandom(2 * B + 10)
    with store.writer(1) as w:
        w.add_bytes("model.keras", payload)
    path = tmp_path / "root" / "step-00000001" / "model.keras"
    for damaged in (payload + b"x", payload[:-1], payload[: B + 5]):
        os.chmod(path, 0o644)
        path.write_bytes(damaged)
        cold(path)
        with pytest.raises(IntegrityError, match="corrupt"):
            store.read_verified(1, "model.keras")
