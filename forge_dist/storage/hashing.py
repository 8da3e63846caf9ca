"""Reading, copying and hashing in chunks: every byte the store moves is hashed once,
on the way (sha256)."""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import IO, Any

from forge_dist.storage.backends.direct import ALIGN, reopen_direct

CHUNK = 4 * 1024 * 1024
#: Writes larger than this are hashed on a helper thread while they are written.
PIPELINE_MIN = 4 * CHUNK
#: Reads in flight when a local file is read whole (benchmarks/bench_resume.py, cold
#: reads of 8 MiB: four in flight beat one at a time, buffered or O_DIRECT; see
#: docs/DESIGN.md, "Reading a step back").
READERS = 4

Progress = Callable[[int], None]


def default_workers(n_items: int, parallel: int | None = None) -> int:
    """Threads for ``n_items`` files: one a file, at most ``parallel`` (else the cores),
    at most 8."""
    return max(1, min(n_items, parallel or os.cpu_count() or 1, 8))


def read_chunks(f: IO[bytes], chunk: int = CHUNK) -> Iterator[bytes | memoryview]:
    """Everything left in ``f``, in chunks: the reader's own where it hands them out
    (``chunks``), else one reused buffer where ``readinto`` exists. Each chunk is only
    valid until the next one is read."""
    chunks = getattr(f, "chunks", None)  # a reader that hands out its own buffers
    if chunks is not None:
        yield from chunks(chunk)
        return
    readinto = getattr(f, "readinto", None)
    if readinto is None:
        while data := f.read(chunk):
            yield data
        return
    view = memoryview(bytearray(chunk))
    while n := readinto(view):
        yield view[:n]


def copy_hashed(
    src: IO[bytes],
    write: Callable[[Any], Any] | None = None,
    progress: Progress | None = None,
) -> tuple[int, str]:
    """``(size, sha256 hex)`` of everything left in ``src``, each chunk also handed to
    ``write`` (a sink's or a file's) when given."""
    h = hashlib.sha256()
    size = 0
    for block in read_chunks(src):
        h.update(block)
        if write is not None:
            write(block)
        size += len(block)
        if progress:
            progress(len(block))
    return size, h.hexdigest()


def hash_stream(f: IO[bytes], progress: Progress | None = None) -> tuple[int, str]:
    """``(size, sha256 hex)`` of everything left in ``f``."""
    return copy_hashed(f, None, progress)


def write_hashed(view: memoryview, write: Callable[[Any], Any], h: Any) -> None:
    """Write ``view`` and add it to the hash ``h``. A large one is cut into chunks and
    chunk k is hashed on a helper thread while chunk k is written: for serializers that
    hand over hundreds of MB in one call, the hash then costs almost no extra time."""
    if len(view) <= PIPELINE_MIN:
        write(view)
        h.update(view)
        return
    pending = []
    with ThreadPoolExecutor(1, thread_name_prefix="forge-dist-hash") as pool:
        try:
            for start in range(0, len(view), CHUNK):
                chunk = view[start : start + CHUNK]
                pending.append(pool.submit(h.update, chunk))
                write(chunk)
        finally:
            for f in pending:
                f.result()


def read_all_hashed(
    src: IO[bytes], size: int, readers: int = READERS, direct: bool = True
) -> tuple[memoryview, int, str]:
    """``(buffer, bytes read, sha256 hex)``: ``src`` read once into one writable buffer
    of ``size`` bytes (what its manifest says), hashed in order while the rest is read.
    A regular local file is read by ``readers`` positional reads in flight, around the
    page cache where the filesystem allows (``O_DIRECT``) unless ``direct`` is false (a
    file several processes of one host read at once, which then share one read of it
    through the page cache); anything else in order, chunk k hashed on a helper thread
    while chunk k+1 is read (hashlib lets go of the interpreter lock). A longer file
    reads as ``size + 1`` bytes (its hash then is of the first ``size``), a shorter one
    as what there was."""
    fd = _regular_file(src) if readers > 1 else None
    if fd is not None:
        # Anonymous memory (its pages are zeroed by the kernel as they are first
        # written, not all at once up front as a bytearray's are), to the next multiple
        # of ALIGN: a direct read's length must be one.
        room = memoryview(mmap.mmap(-1, -(-size // ALIGN) * ALIGN) if size else bytearray())
        pos, digest = _pread_hashed(fd, room, size, readers, direct)
        return room[:size], pos + (pos == size and bool(os.pread(fd, 1, size))), digest
    view = memoryview(mmap.mmap(-1, size) if size else bytearray())
    h = hashlib.sha256()
    readinto = getattr(src, "readinto", None)
    pos = 0
    with ThreadPoolExecutor(1, thread_name_prefix="forge-dist-hash") as pool:
        pending = None
        while pos < size:
            chunk = view[pos : pos + 2 * CHUNK]
            if readinto is not None:
                n = readinto(chunk)
            else:
                data = src.read(len(chunk))
                n = len(data)
                chunk[:n] = data
            if not n:
                break
            if pending is not None:
                pending.result()
            pending = pool.submit(h.update, chunk[:n])
            pos += n
        if pending is not None:
            pending.result()
    if pos == size and src.read(1):
        pos += 1
    return view, pos, h.hexdigest()


def _regular_file(src: Any) -> int | None:
    """The descriptor of ``src`` where it is a regular file of this machine's."""
    try:
        fd = src.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):
        return None


def _fill(fd: int, direct: int | None, room: memoryview, offset: int, want: int) -> int:
    """Bytes read into ``room`` (``want`` of them, rounded up to ALIGN) from ``offset``
    of the file: all ``want`` unless the file ends first. Read through ``direct`` (the
    file opened ``O_DIRECT``, or None) while the reads stay aligned and the filesystem
    takes them; the rest, after a short read at the end or any error of a direct read
    (an I/O error then comes again from the buffered one), through ``fd``."""
    got = 0
    while got < want:
        if direct is not None and got % ALIGN == 0:
            try:
                n = os.preadv(direct, [room[got:]], offset + got)
            except OSError:
                direct = None  # refused here (EINVAL, mostly): the page cache's way
                continue
        else:
            n = os.preadv(fd, [room[got:want]], offset + got)
        if not n:
            break
        got += n
    return min(got, want)


def _pread_hashed(
    fd: int, room: memoryview, size: int, readers: int, direct_io: bool = True
) -> tuple[int, str]:
    """``(bytes read, sha256 hex)`` of the file ``fd`` has open, read into ``room``
    (``size`` bytes, and room to an ALIGN boundary after them): chunks read by
    ``readers`` threads, a few ahead of the hash, which takes them in order here (the
    file ending early stops it: what follows is not hashed).

    Reads go around the page cache where the filesystem allows: a cold buffered read
    fills page-cache pages first, fresh memory the hypervisor may have taken back, and
    then copies them (measured: docs/DESIGN.md, "Reading a step back")."""
    h = hashlib.sha256()
    step = 2 * CHUNK
    offsets = iter(range(0, size, step))
    direct = reopen_direct(fd) if direct_io and size else None

    def read(o: int) -> tuple[int, Any]:
        want = min(step, size - o)
        return o, pool.submit(_fill, fd, direct, room[o : o + -(-want // ALIGN) * ALIGN], o, want)

    pos = 0
    try:
        with ThreadPoolExecutor(readers, thread_name_prefix="forge-dist-read") as pool:
            ahead = [read(o) for o in islice(offsets, readers + 1)]
            while ahead:
                o, reading = ahead.pop(0)
                got = reading.result()
                h.update(room[o : o + got])
                pos = o + got
                if pos < min(o + step, size):
                    break  # the file ended early
                ahead += [read(o) for o in islice(offsets, 1)]
            for _, reading in ahead:
                reading.cancel()
    finally:
        if direct is not None:
            os.close(direct)
    return pos, h.hexdigest()
