"""The manifest-last commit, for object stores (s3, gs, az, memory, ...).

Rename is copy+delete there, so the payload goes straight under ``step-N/`` and
``manifest.json`` is written last as one single-object PUT; a prefix without a
manifest is uncommitted. A delete removes the manifest first (one atomic uncommit).
:class:`ObjectBackend` does it through fsspec's generic calls; a store whose API allows
better subclasses it (:class:`~.s3.S3Backend`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import IO, Any, BinaryIO

from forge_dist.errors import CheckpointExistsError, ManifestError, StorageError
from forge_dist.storage import _faults
from forge_dist.storage._errors import storage_errors
from forge_dist.storage.backends.base import (
    LEASE_NAME,
    PROBE_PREFIX,
    Backend,
    FileStat,
    Sink,
    writer_id,
)
from forge_dist.storage.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, step_dirname

log = logging.getLogger("forge_dist.storage")


#: Below this a file is held, then sent in one whole-object upload (``pipe_file``: adlfs'
#: concurrent blocks; GCS: :class:`~.gcs.MultipartSink`); above it, through the client's file.
WHOLE_BYTES = 64 * 1024 * 1024


class _FsspecSink(Sink):
    """A file written through fsspec's generic calls. It is held until it outgrows
    :data:`WHOLE_BYTES` (one ``bytes`` handed over whole is kept, not copied) and then
    sent in one ``pipe_file`` at ``close``; a larger one streams through the client's
    file object. Nothing reaches the store before the file has outgrown the buffer, so
    a sink discarded early leaves nothing."""

    whole_below = WHOLE_BYTES

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.f: IO[bytes] | None = None
        self._held: list[bytes] = []
        self._size = 0
        self._closed = False

    def write(self, data: bytes | memoryview) -> None:
        if self.f is None:
            self._held.append(data if isinstance(data, bytes) else bytes(data))
            self._size += len(data)
            if self._size < self.whole_below:
                return
            self.f = self.fs.open(self.path, "wb")
            held, self._held = self._held, []
            for chunk in held:
                self.f.write(chunk)
            return
        self.f.write(bytes(data) if isinstance(data, memoryview) else data)

    def close(self, sha256: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.f is None:
            held, self._held = self._held, []
            self.fs.pipe_file(self.path, held[0] if len(held) == 1 else b"".join(held))
            return
        f, self.f = self.f, None
        f.close()

    def discard(self) -> None:
        """Drop the file unwritten. Closing would upload what it holds (fsspec's
        buffered files send their buffer on close, also when collected as garbage, and
        gcsfs' ``discard`` only cancels an upload already begun): it is marked closed
        instead, after its own ``discard``."""
        self._closed = True
        self._held = []
        if self.f is not None:
            f, self.f = self.f, None
            with contextlib.suppress(Exception):
                if hasattr(f, "discard"):
                    f.discard()
            with contextlib.suppress(Exception):
                f.closed = True


#: Reads through an asynchronous client: an object in ranges of this size, this many
#: requested ahead of the reader (fsspec's file objects fetch one block after another).
RANGE_BYTES = 8 * 1024 * 1024
RANGES_AHEAD = 2


class AheadReader(io.RawIOBase):
    """An object read front to back with :attr:`ahead` ranged reads of :attr:`range_bytes`
    in flight on the client's event loop (fsspec's file objects fetch one block after
    another): for verify, download, cp. Here through ``_cat_file`` with ``start``/``end``,
    on any asynchronous fsspec filesystem (adlfs, gcsfs); :mod:`.s3wire` fetches S3's
    ranges its own way."""

    ahead = RANGES_AHEAD

    @property
    def range_bytes(self) -> int:  # read at call time: tests shrink ranges
        return RANGE_BYTES

    def __init__(self, fs: Any, path: str, size: int) -> None:
        super().__init__()
        self.fs, self.path, self.size = fs, path, size
        self._next = 0  # the next offset to ask for
        self._ahead: list[Any] = []  # futures of the ranges ahead: lists of chunks
        self._chunks: list[bytes] = []  # the current range's chunks not yet read
        self._chunk = memoryview(b"")

    async def _fetch(self, start: int, end: int) -> list[bytes]:
        """Bytes ``[start, end)`` as a list of chunks."""
        data = await self.fs._cat_file(self.path, start=start, end=end)
        if len(data) != end - start:
            raise OSError(f"{self.path}: {len(data)} bytes of a {end - start}-byte range arrived")
        return [data]

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        import asyncio

        while len(self._ahead) < self.ahead and self._next < self.size:
            end = min(self.size, self._next + self.range_bytes)
            coro = self._fetch(self._next, end)
            self._ahead.append(asyncio.run_coroutine_threadsafe(coro, self.fs.loop))
            self._next = end

    def _more(self) -> bool:
        """Make the next fetched chunk current; False at the end."""
        if not self._chunks:
            self._fill()
            if not self._ahead:
                return False
            with storage_errors(f"cannot read {self.path}"):
                self._chunks = self._ahead.pop(0).result()
            self._fill()
        self._chunk = memoryview(self._chunks.pop(0))
        return True

    def readinto(self, b: Any) -> int:
        if not self._chunk and not self._more():
            return 0
        n = min(len(b), len(self._chunk))
        memoryview(b).cast("B")[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def chunks(self, size: int) -> Iterator[memoryview]:
        """What is left, in views of at most ``size`` bytes of the fetched ranges
        themselves (:func:`~forge_dist.storage.hashing.read_chunks` takes these rather
        than copying every byte once more through ``readinto``)."""
        while self._chunk or self._more():
            piece, self._chunk = self._chunk[:size], self._chunk[size:]
            yield piece

    def close(self) -> None:
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()
        super().close()


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("LastModified", "mtime", "updated", "created", "last_modified"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            from datetime import datetime

            try:
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class ObjectBackend(Backend):
    rename_commit = False
    parallel_files = 8
    conditional_writes = False  # write_lease is a plain write (S3Backend's is not)
    #: Whether a listing shows every object written before it (GCS, Azure and S3 since
    #: 2020; not every fsspec store, nor every cache in front of one).
    consistent_listing = False
    #: How an object is read front to back through an asynchronous client (a cloud's
    #: backend fetches its ranges its own way where that costs less).
    reader: type[AheadReader] = AheadReader

    def __init__(self, fs: Any, root: str, display: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.display = display
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.protocol = protocol
        self.bucketed = protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss")
        # Manifests whose write ended in an error, by staging: the write may still have
        # landed (only its answer lost), and abort must know them from another writer's.
        self._unsure: dict[str, bytes] = {}

    @classmethod
    def accepts(cls, fs: Any) -> bool:
        """Whether this backend can drive ``fs`` (a subclass may need its client's own
        calls; make_backend falls back to this generic one)."""
        return True

    def _p(self, name: str, rel: str = "") -> str:
        return f"{self.root}/{name}/{rel}" if rel else f"{self.root}/{name}"

    def _fresh(self, path: str | None = None) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def check_root(self) -> None:
        self.list_root()

    def list_root(self) -> list[tuple[str, bool]]:
        self._fresh()
        with storage_errors(f"cannot list checkpoint root {self.display}"):
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                if self.bucketed:
                    bucket = self.root.split("/", 1)[0]
                    if not self.fs.exists(bucket):
                        raise StorageError(
                            f"bucket {bucket!r} of {self.display} does not exist"
                        ) from None
                return []
        out = []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e["name"].rstrip("/") == self.root:
                if e.get("type") == "file":
                    raise StorageError(f"checkpoint root {self.display} is a file")
                continue
            out.append((name, e.get("type") == "directory"))
        return out

    def _get_small(self, path: str, limit: int) -> tuple[bytes, Any] | None:
        """A small object (a manifest, the lease) and the token a conditional write of it
        would name (its ETag here), or None when it is missing; larger than ``limit`` is
        a :class:`ManifestError`. A subclass reads both in one request where its API can.
        """
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") != "file":
            return None
        if (info.get("size") or 0) > limit:
            raise ManifestError(f"{path.rsplit('/', 1)[-1]} is larger than {limit} bytes")
        return bytes(self.fs.cat_file(path)), info.get("ETag") or info.get("etag")

    def read_manifest(self, name: str) -> bytes | None:
        with storage_errors(f"cannot read {name}/{MANIFEST_NAME}"):
            got = self._get_small(self._p(name, MANIFEST_NAME), MAX_MANIFEST_BYTES)
        return None if got is None else got[0]

    def stat(self, name: str, rel: str) -> FileStat | None:
        with storage_errors(f"cannot stat {name}/{rel}"):
            try:
                info = self.fs.info(self._p(name, rel))
            except FileNotFoundError:
                return None
        if info.get("type") != "file":
            return FileStat(0, regular=False)
        return FileStat(int(info.get("size") or 0))

    def _find(self, name: str) -> dict[str, dict[str, Any]]:
        base = self._p(name)
        self._fresh(base)
        with storage_errors(f"cannot list {name}"):
            try:
                return dict(self.fs.find(base, detail=True))
            except FileNotFoundError:
                return {}

    def walk(self, name: str) -> dict[str, FileStat]:
        base = self._p(name)
        out = {}
        for path, info in self._find(name).items():
            rel = path[len(base) + 1 :] if path.startswith(base + "/") else path
            if rel == MANIFEST_NAME or info.get("type") != "file":
                continue
            out[rel] = FileStat(int(info.get("size") or 0))
        return out

    def open_read(self, name: str, rel: str) -> BinaryIO:
        path = self._p(name, rel)
        with storage_errors(f"cannot open {name}/{rel}"):
            if getattr(self.fs, "async_impl", False) and getattr(self.fs, "loop", None):
                size = int(self.fs.info(path).get("size") or 0)
                return self.reader(self.fs, path, size)  # type: ignore[return-value]
            return self.fs.open(path, "rb")

    def newest_mtime(self, name: str) -> float | None:
        times = [t for info in self._find(name).values() if (t := _mtime(info)) is not None]
        return max(times) if times else None

    def begin(self, step: int, replace: bool) -> str:
        name = step_dirname(step)
        committed, leftovers = self._step_state(name)
        if committed:
            if not replace:
                raise CheckpointExistsError(
                    f"{name} is already committed in {self.display}; "
                    "pass replace=True to overwrite it"
                )
            self.delete_committed(name)
        elif leftovers:
            # An uncommitted prefix left by a writer that died: this step is ours now.
            self.remove_uncommitted(name)
        return name

    def _step_state(self, name: str) -> tuple[bool, bool]:
        """Whether step ``name`` is committed, and whether it has objects (failing
        clearly on a missing bucket or an unreachable endpoint). Where listings are
        consistent with writes, a step the root's listing does not show has no object
        at all: one request for a new step, instead of three."""
        shown = {n for n, _ in self.list_root()}
        if self.consistent_listing and name not in shown:
            return False, False
        committed = self.read_manifest(name) is not None
        return committed, not committed and bool(self.walk(name))

    def open_write(self, staging: str, rel: str) -> Sink:
        with storage_errors(f"cannot create {rel} in {staging}"):
            return _FsspecSink(self.fs, self._p(staging, rel))

    def commit(self, staging: str, step: int, manifest: bytes, replace: bool) -> None:
        _faults.point("before-manifest")
        path = self._p(staging, MANIFEST_NAME)
        try:
            with storage_errors(f"cannot write the manifest of {staging}"):
                self.fs.pipe_file(path, manifest)
        except StorageError:
            # The request may have landed and only its answer been lost: the manifest
            # there, byte for byte this one, is this commit. Otherwise the save failed
            # (and abort removes this manifest should it turn up later).
            self._unsure[staging] = manifest
            if not self._holds(path, manifest):
                raise
            del self._unsure[staging]
            log.info("%s in %s: the manifest landed though its write failed", staging, self.display)
        self._fresh()
        _faults.point("manifest-written")
        _faults.point("committed")

    def _holds(self, path: str, data: bytes, tries: int = 3) -> bool:
        """Whether ``path`` holds exactly ``data`` (False when it cannot be read)."""
        for _ in range(tries):
            try:
                self._fresh(path)
                got = self._get_small(path, MAX_MANIFEST_BYTES)
            except Exception:
                continue
            return got is not None and got[0] == data
        return False

    def probe(self) -> None:
        self.list_root()  # a missing bucket or an unreachable endpoint, said clearly
        probe = f"{self.root}/{PROBE_PREFIX}{writer_id()}"
        with storage_errors(f"checkpoint root {self.display} is not writable"):
            self.fs.pipe_file(probe, b"probe")
            self.fs.rm_file(probe)
        self._fresh()

    def remove_root(self) -> None:
        lease = f"{self.root}/{LEASE_NAME}"
        gone = contextlib.suppress(FileNotFoundError)
        with storage_errors(f"cannot remove {self.display}"), gone:
            self.fs.rm_file(lease)

    def read_lease(self) -> tuple[bytes | None, Any]:
        path = f"{self.root}/{LEASE_NAME}"
        with storage_errors(f"cannot read the writer lease of {self.display}"):
            self._fresh(path)
            return self._get_small(path, MAX_MANIFEST_BYTES) or (None, None)

    def write_lease(self, data: bytes, token: Any) -> bool:
        """No compare-and-swap through fsspec's generic calls: the lease is a plain
        write, checked before and after (:attr:`conditional_writes` is False)."""
        path = f"{self.root}/{LEASE_NAME}"
        with storage_errors(f"cannot write the writer lease of {self.display}"):
            self.fs.pipe_file(path, data)
            self._fresh(path)
        return True

    def abort(self, staging: str) -> None:
        """Remove what this writer left under ``staging`` (the step's own prefix here),
        unless a manifest is there: then another writer committed this step (a newer
        attempt that took the lease, say) and the prefix is its, not ours to remove."""
        with contextlib.suppress(Exception):
            self._fresh()
            ours = self._unsure.pop(staging, None)
            if ours is not None and self._holds(self._p(staging, MANIFEST_NAME), ours):
                # This writer's own manifest, whose write was reported failed: the save
                # failed, so the step goes (manifest first, then its files).
                log.warning("%s in %s: removing the step of a failed save", staging, self.display)
                self.delete_committed(staging)
                return
            if self.fs.exists(self._p(staging, MANIFEST_NAME)):
                log.warning(
                    "%s in %s was committed by another writer: left as it is",
                    staging,
                    self.display,
                )
                return
            self.remove_uncommitted(staging)

    def delete_committed(self, name: str) -> None:
        with storage_errors(f"cannot delete {name}"):
            self.fs.rm_file(self._p(name, MANIFEST_NAME))
        self._fresh()
        _faults.point(f"deleted:{name}")
        self.remove_uncommitted(name)

    def remove_uncommitted(self, name: str) -> None:
        files = list(self.walk(name))
        with storage_errors(f"cannot remove {name}"):
            if files:
                self.fs.rm([self._p(name, rel) for rel in files])
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._p(name), recursive=True)
        self._fresh()
