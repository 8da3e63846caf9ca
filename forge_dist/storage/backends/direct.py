"""Writing a checkpoint file around the page cache (Linux ``O_DIRECT``), from staging
buffers that every file reuses; and the descriptor a restore reads one through
(:func:`reopen_direct`, used by :func:`forge_dist.storage.hashing.read_all_hashed`).

A buffered write copies the file into page-cache pages the kernel takes from free
memory, and retention frees the previous checkpoint's pages each save. Where the
hypervisor takes freed guest memory back (virtio-balloon free page reporting, as on the
Firecracker VMs this project is measured on), every one of those fresh pages costs a
host fault: measured here, writing and fsyncing one 605 MB file went from 0.33 s to
2.4 s within eight saves three seconds apart (see docs/DESIGN.md). ``O_DIRECT`` sends
the bytes from the process' own buffer to the device instead: the buffer is allocated
and touched once, no dirty pages are left for the kernel to write back later (the fsync
finds nothing to do), and the time stays the device's (0.22-0.29 s for the same file).

:class:`DirectWriter` collects the sink's writes in an aligned buffer and writes it
whole (``O_DIRECT`` needs aligned memory, offsets and lengths); the unaligned tail goes
through the page cache after clearing the flag. A filesystem that refuses ``O_DIRECT``
(tmpfs before Linux 6.6, many FUSE mounts) at open or at the first write gets ordinary
writes, with nothing lost. ``FORGE_DIST_DIRECT_IO=0`` turns it off, for reads too.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

#: Memory address, file offset and length of a direct write are multiples of this (the
#: largest logical block size of common devices).
ALIGN = 4096
#: One staging buffer: one direct write of this size at a time.
BUFFER_BYTES = 8 * 1024 * 1024
#: Idle buffers kept for the next files (one per file written at the same time).
KEEP_IDLE = 4

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def enabled() -> bool:
    """Direct writes and reads where the platform has them, unless
    ``FORGE_DIST_DIRECT_IO=0``."""
    return bool(_O_DIRECT) and os.environ.get("FORGE_DIST_DIRECT_IO", "1") != "0"


class _Pool:
    """Page-aligned anonymous buffers, faulted in once and handed out again."""

    def __init__(self) -> None:
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        buf = mmap.mmap(-1, BUFFER_BYTES)
        memoryview(buf)[:] = bytes(BUFFER_BYTES)  # every page now, not in the first write
        return buf

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._idle) < KEEP_IDLE:
                self._idle.append(buf)
                return
        buf.close()


_pool = _Pool()


def open_direct(path: str, flags: int, mode: int) -> tuple[int, bool]:
    """``os.open(path, flags)`` with ``O_DIRECT`` where it is on and the filesystem takes
    it; returns the descriptor and whether it is direct."""
    if enabled():
        try:
            return os.open(path, flags | _O_DIRECT, mode), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no direct I/O
                raise
    return os.open(path, flags, mode), False


def reopen_direct(fd: int) -> int | None:
    """A second descriptor of the file ``fd`` has open, for direct reads of it (Linux:
    through ``/proc/self/fd``); None where direct I/O is off, or the platform or the
    filesystem has none. Its reads need aligned memory, offsets and lengths, as writes
    do; the caller closes it."""
    if not enabled():
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | _O_DIRECT)
    except OSError:  # EINVAL: no direct I/O on this filesystem; ENOENT: no /proc
        return None


class DirectWriter:
    """Sequential writes to ``fd`` (opened by :func:`open_direct`, nothing written yet):
    :meth:`write` as often as needed, then :meth:`finish` (before the fsync) or
    :meth:`release` alone on a failure."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf: mmap.mmap | None = _pool.take()
        self._view = memoryview(self._buf)
        self._fill = 0
        self.direct = True  # false once the filesystem refused a direct write

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if not self.direct:
                write_all(self.fd, view)
                return
            n = min(len(view), BUFFER_BYTES - self._fill)
            self._view[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == BUFFER_BYTES:
                self._fill = 0
                self._put(self._view)

    def finish(self) -> None:
        """Write what is buffered: the aligned part directly, the rest buffered."""
        try:
            aligned = self._fill - self._fill % ALIGN
            self._put(self._view[:aligned])
            if self._fill > aligned:
                self._buffered()
                write_all(self.fd, self._view[aligned : self._fill])
            self._fill = 0
        finally:
            self.release()

    def release(self) -> None:
        """Give the staging buffer back (the descriptor stays the caller's)."""
        if self._buf is not None:
            self._view.release()
            buf, self._buf = self._buf, None
            _pool.give(buf)

    def _put(self, view: memoryview) -> None:
        """Write ``view`` (aligned, at an aligned offset) directly while the filesystem
        takes it; what it refuses, or what follows a short write, buffered."""
        while view and self.direct:
            try:
                written = os.write(self.fd, view)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered()  # opened with O_DIRECT, but these writes are refused
                break
            view = view[written:]
            if not written or written % ALIGN:  # the offset is no longer aligned
                self._buffered()
        write_all(self.fd, view)

    def _buffered(self) -> None:
        if self.direct:
            import fcntl  # (POSIX only, as O_DIRECT is)

            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
            self.direct = False


def write_all(fd: int, view: memoryview) -> None:
    """``os.write`` until all of ``view`` is written."""
    while view:
        view = view[os.write(fd, view) :]
