"""A zip archive of stored (uncompressed) entries, written front to back into a
non-seekable file, with each entry's CRC-32 computed on a helper thread behind the
writes (Python's ``zipfile`` computes it before each write, on the writing thread).

The layout is the one ``zipfile`` itself writes to a non-seekable stream (PKWARE's
APPNOTE 4.3): a local header with bit 3 set, the data, a data descriptor with the CRC
and sizes, then the central directory; ZIP64 records where an entry, an offset or the
entry count needs them. Keras reads ``.keras`` archives with ``zipfile``.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

_LOCAL = 0x04034B50
_DESCRIPTOR = 0x08074B50
_CENTRAL = 0x02014B50
_END = 0x06054B50
_END64 = 0x06064B50
_LOCATOR64 = 0x07064B50
_LIMIT = 0xFFFFFFFF
_DATA_DESCRIPTOR = 0x08
_UTF8 = 0x800


def _dos_time(t: float) -> tuple[int, int]:
    lt = time.localtime(t)
    year = max(lt.tm_year, 1980)
    return (
        (lt.tm_hour << 11) | (lt.tm_min << 5) | (lt.tm_sec // 2),
        ((year - 1980) << 9) | (lt.tm_mon << 5) | lt.tm_mday,
    )


class _Running:
    """A CRC-32 over chunks in order: on the calling thread, or on ``thread`` (one
    worker, so its tasks run in order and each finds the previous one's value)."""

    def __init__(self, thread: ThreadPoolExecutor | None) -> None:
        self._thread = thread
        self._value = 0
        self._last: Any = None

    def update(self, view: memoryview) -> None:
        if self._thread is None:
            self._value = zlib.crc32(view, self._value)
        else:
            self._last = self._thread.submit(self._step, view)

    def _step(self, view: memoryview) -> None:
        self._value = zlib.crc32(view, self._value)

    def value(self) -> int:
        if self._last is not None:
            self._last.result()  # the last task ran after every earlier one
        return self._value


class StoredZip:
    """``with StoredZip(f) as z: z.add(name, chunks)``; closing writes the directory."""

    def __init__(self, fileobj: IO[bytes], crc_behind: bool = True) -> None:
        self._f = fileobj
        self._offset = 0
        self._entries: list[tuple[bytes, int, int, int, int]] = []  # name, flags, crc, size, at
        self._time = _dos_time(time.time())
        self._crc_thread = ThreadPoolExecutor(1, "forge-dist-crc") if crc_behind else None

    def __enter__(self) -> StoredZip:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._directory()
        finally:
            if self._crc_thread is not None:
                self._crc_thread.shutdown(wait=True)

    def _write(self, data: Any) -> None:
        self._f.write(data)
        self._offset += len(memoryview(data).cast("B"))

    def add(self, name: str, chunks: Iterable[Any]) -> None:
        """One entry from ``chunks`` (bytes or views that stay unchanged until the
        archive is closed: they are CRC'd behind the writes)."""
        encoded = name.encode("utf-8")
        flags = _DATA_DESCRIPTOR | (_UTF8 if not name.isascii() else 0)
        at = self._offset
        # ZIP64 from the start (sizes unknown here): an extra field with zero sizes.
        extra = struct.pack("<HHQQ", 1, 16, 0, 0)
        self._write(
            struct.pack("<IHHHHHIII", _LOCAL, 45, flags, 0, *self._time, 0, _LIMIT, _LIMIT)
            + struct.pack("<HH", len(encoded), len(extra))
            + encoded
            + extra
        )
        size = 0
        crc = _Running(self._crc_thread)
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            self._write(view)
            size += len(view)
            crc.update(view)
        value = crc.value()
        self._write(struct.pack("<IIQQ", _DESCRIPTOR, value, size, size))
        self._entries.append((encoded, flags, value, size, at))

    def _directory(self) -> None:
        start = self._offset
        for encoded, flags, crc, size, at in self._entries:
            extra = struct.pack("<HHQQQ", 1, 24, size, size, at)
            self._write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    _CENTRAL,
                    (3 << 8) | 45,  # made by: Unix (for the mode below), ZIP64-aware
                    45,  # needed to extract
                    flags,
                    0,  # stored
                    *self._time,
                    crc,
                    _LIMIT,
                    _LIMIT,
                    len(encoded),
                    len(extra),
                    0,  # comment
                    0,  # disk
                    0,  # internal attributes
                    0o644 << 16,  # external: a regular file, rw-r--r--
                    _LIMIT,
                )
                + encoded
                + extra
            )
        end = self._offset
        n = len(self._entries)
        self._write(struct.pack("<IQHHIIQQQQ", _END64, 44, 45, 45, 0, 0, n, n, end - start, start))
        self._write(struct.pack("<IIQI", _LOCATOR64, 0, end, 1))
        self._write(
            struct.pack("<IHHHHIIH", _END, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), _LIMIT, _LIMIT, 0)
        )
