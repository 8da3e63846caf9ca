"""``CheckpointWriter``: stages one step, hashing every file as it is written, and
commits it through the backend's protocol (the manifest last)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from forge_dist._launch import launch_environment
from forge_dist.errors import ConfigurationError, ManifestError, StaleWriterError, StorageError
from forge_dist.storage import _faults
from forge_dist.storage import lease as lease_mod
from forge_dist.storage._errors import describe, storage_errors
from forge_dist.storage.backends import Backend
from forge_dist.storage.hashing import copy_hashed, default_workers, write_hashed
from forge_dist.storage.lease import Lease
from forge_dist.storage.manifest import (
    FileEntry,
    Manifest,
    normalise_metrics,
    step_dirname,
    validate_relpath,
)
from forge_dist.storage.types import CheckpointInfo

log = logging.getLogger("forge_dist.storage")


class CheckpointWriter:
    """Stages one step; files are hashed as they are written. Use through
    :meth:`CheckpointStore.writer` as a context manager: leaving the block normally
    commits, an exception discards everything written."""

    def __init__(
        self,
        backend: Backend,
        display: str,
        step: int,
        *,
        metrics: Mapping[str, float] | None,
        state: Mapping[str, Any] | None,
        writer: Mapping[str, Any] | None,
        replace: bool,
        after_commit: Callable[[], None] | None = None,
        run: Mapping[str, Any] | None = None,
        lease: Lease | None = None,
        created: str | None = None,
    ) -> None:
        self._backend = backend
        self.created = created  # None: now (a copy keeps the source's)
        self.display = display
        self.step = step
        self.name = step_dirname(step)
        self.metrics: dict[str, float] = dict(metrics or {})
        self.state: dict[str, Any] = dict(state or {})
        self.writer_info: dict[str, Any] = dict(writer or default_writer_info())
        self.replace = replace
        self._entries: dict[str, FileEntry] = {}
        self._lock = threading.Lock()
        self._staging: str | None = None
        self._done = False
        self._after_commit = after_commit
        self.run: dict[str, Any] = dict(run or {})
        self.lease = lease  # the writer generation that must still hold the root
        if lease is not None:
            self.writer_info["generation"] = lease.generation
        self.committed: CheckpointInfo | None = None

    # -- lifecycle
    def __enter__(self) -> CheckpointWriter:
        self.begin()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def begin(self) -> None:
        if self._staging is not None:
            raise ConfigurationError("this writer has already begun")
        # begin may remove what an earlier writer left of this step (on object stores,
        # files under the step's own prefix): a stale writer removes nothing.
        self._fence()
        self._staging = self._backend.begin(self.step, self.replace)

    def _fence(self) -> None:
        """Raise :class:`StaleWriterError` if a newer writer took the root's lease: at
        begin and before each file becomes visible (its PUT, or the end of its multipart
        upload). On object stores a file lands at its final name, so a stale writer's
        file would overwrite the same file of a step that the newer writer wrote; on
        POSIX roots the stale writer just learns it before writing more."""
        if self.lease is not None:
            lease_mod.check(self._backend, self.lease)

    def _reserve(self, relpath: str) -> str:
        rel = validate_relpath(relpath)
        if self._done or self._staging is None:
            raise ConfigurationError("the writer is not open (use it inside its `with` block)")
        with self._lock:
            clash = [
                p
                for p in self._entries
                if p == rel or p.startswith(rel + "/") or rel.startswith(p + "/")
            ]
            if clash:
                raise ManifestError(f"{rel!r} clashes with {clash[0]!r} already in this checkpoint")
            self._entries[rel] = FileEntry(rel, -1, "")
        return rel

    def _copy(self, rel: str, src: IO[bytes], size: int | None = None) -> FileEntry:
        """``src`` into ``rel``; ``size``, when known, lets a file the sink sends in one
        request be read in one piece and handed over without a copy."""
        assert self._staging is not None
        sink = self._backend.open_write(self._staging, rel)
        try:
            with storage_errors(f"cannot write {self.name}/{rel} in {self.display}"):
                if size is not None and size < sink.whole_below:
                    data = src.read()
                    size, digest = len(data), hashlib.sha256(data).hexdigest()
                    sink.write(data)
                else:
                    size, digest = copy_hashed(src, sink.write)
                self._fence()
                sink.close(digest)
        except BaseException:
            sink.discard()
            with self._lock:
                self._entries.pop(rel, None)
            raise
        return self._finish(rel, size, digest)

    # -- adding payload
    def open(self, relpath: str, hash_behind: bool = False) -> _HashingFile:
        """A write-only, non-seekable binary file at ``relpath``; its size and sha256 are
        computed as it is written (for serializers that write to a file object).

        ``hash_behind=True`` is for callers whose buffers stay unchanged until the file
        is closed (views of arrays): each write is hashed on a helper thread while the
        next ones are written, instead of before the write returns."""
        rel = self._reserve(relpath)
        assert self._staging is not None
        sink = self._backend.open_write(self._staging, rel)
        return _HashingFile(self, rel, sink, hash_behind)

    def _finish(self, rel: str, size: int, digest: str) -> FileEntry:
        entry = FileEntry(rel, size, digest)
        with self._lock:
            self._entries[rel] = entry
        _faults.point(f"file-written:{rel}")
        return entry

    def add_stream(self, relpath: str, stream: IO[bytes]) -> FileEntry:
        """Copy an open binary stream to ``relpath``, hashing it on the way."""
        return self._copy(self._reserve(relpath), stream)

    def add_bytes(self, relpath: str, data: bytes) -> FileEntry:
        return self.add_stream(relpath, io.BytesIO(data))

    def add_file(self, relpath: str, src_path: str | os.PathLike[str]) -> FileEntry:
        """Copy a local file to ``relpath``, hashing it on the way (read once)."""
        rel = self._reserve(relpath)
        try:
            f = open(src_path, "rb", buffering=0)  # noqa: SIM115
        except OSError as e:
            with self._lock:
                self._entries.pop(rel, None)
            raise StorageError(f"cannot read {src_path}: {describe(e)}") from e
        with f:
            return self._copy(rel, f, os.fstat(f.fileno()).st_size)

    def add_tree(
        self, src_dir: str | os.PathLike[str], prefix: str = "", max_workers: int | None = None
    ) -> list[FileEntry]:
        """Copy every regular file under a local folder, several files at once.

        Symbolic links are refused rather than followed."""
        src_dir = os.fspath(src_dir)
        pairs: list[tuple[str, str]] = []
        for dirpath, dirnames, filenames in os.walk(src_dir, followlinks=False):
            dirnames.sort()
            for fname in sorted(filenames) + [
                d for d in dirnames if os.path.islink(os.path.join(dirpath, d))
            ]:
                full = os.path.join(dirpath, fname)
                if os.path.islink(full):
                    raise ConfigurationError(f"refusing to store the symbolic link {full}")
                rel = os.path.relpath(full, src_dir).replace(os.sep, "/")
                pairs.append((prefix + rel, full))
        workers = max_workers or default_workers(len(pairs), self._backend.parallel_files)
        if workers <= 1 or len(pairs) <= 1:
            return [self.add_file(r, p) for r, p in pairs]
        with ThreadPoolExecutor(workers, thread_name_prefix="forge-dist-put") as pool:
            return list(pool.map(lambda rp: self.add_file(*rp), pairs))

    # -- finishing
    @property
    def files(self) -> list[FileEntry]:
        return sorted(self._entries.values(), key=lambda e: e.path)

    def commit(self) -> CheckpointInfo:
        if self._done:
            raise ConfigurationError("this checkpoint was already committed or aborted")
        if self._staging is None:
            raise ConfigurationError("the writer has not begun")
        try:
            unfinished = [e.path for e in self._entries.values() if e.size < 0]
            if unfinished:
                raise ConfigurationError(f"files still being written: {unfinished}")
            when = {"created": self.created} if self.created else {}
            manifest = Manifest(
                step=self.step,
                files=tuple(self.files),
                **when,
                writer=self.writer_info,
                metrics=normalise_metrics(self.metrics),
                state=self.state,
                versions=versions(),
                run=self.run,
            )
            data = manifest.to_bytes()
            with lease_mod.guarded(self._backend, self.lease):
                self._backend.commit(self._staging, self.step, data, self.replace)
        except BaseException:
            self.abort()
            raise
        self._done = True
        lease_mod.after(
            self._backend, self.lease, lambda: self._backend.delete_committed(self.name)
        )
        self.committed = CheckpointInfo(self.name, self.step, manifest)
        if self._after_commit is not None:
            try:
                self._after_commit()
            except StorageError as e:
                log.warning("after committing %s in %s: %s", self.name, self.display, e)
        log.info(
            "committed %s in %s (%d files, %d bytes)",
            self.name,
            self.display,
            len(manifest.files),
            manifest.total_bytes,
        )
        return self.committed

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._staging is None:
            return
        if self.lease is not None and not self._backend.rename_commit:
            # On object stores the staging is the step's own prefix, where a newer writer
            # may be writing the same step right now: a stale writer leaves it (the newer
            # writer's begin of that step, or gc once it is stale, removes it).
            try:
                lease_mod.check(self._backend, self.lease)
            except StaleWriterError:
                log.warning(
                    "%s in %s: a newer writer holds the root; its files left as they are",
                    self.name,
                    self.display,
                )
                return
            except StorageError:
                pass  # unreadable lease: clean up what is ours as before
        self._backend.abort(self._staging)


class _HashingFile(io.RawIOBase):
    """What :meth:`CheckpointWriter.open` returns. Closing it records the file; an error
    while writing leaves it out (and the writer's block discards the staging)."""

    def __init__(
        self, writer: CheckpointWriter, rel: str, sink: Any, hash_behind: bool = False
    ) -> None:
        super().__init__()
        self._writer = writer
        self._rel = rel
        self._sink = sink
        self._hash = hashlib.sha256()
        self._size = 0
        self._failed = False
        self.entry: FileEntry | None = None
        self._behind = ThreadPoolExecutor(1, "forge-dist-hash") if hash_behind else None
        self._hashed: list[Any] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed checkpoint file")
        view = memoryview(data).cast("B")
        try:
            with storage_errors(f"cannot write {self._writer.name}/{self._rel}"):
                if self._behind is not None:  # in order: one thread
                    self._sink.write(view)
                    self._hashed.append(self._behind.submit(self._hash.update, view))
                else:
                    write_hashed(view, self._sink.write, self._hash)
        except BaseException:
            self._failed = True
            raise
        self._size += len(view)
        return len(view)

    def tell(self) -> int:
        return self._size

    def _hash_done(self) -> None:
        if self._behind is not None:
            self._behind.shutdown(wait=True)
            for f in self._hashed:
                f.result()
            self._hashed.clear()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._hash_done()
            if self._failed:
                self._sink.discard()
                with self._writer._lock:
                    self._writer._entries.pop(self._rel, None)
            else:
                digest = self._hash.hexdigest()
                try:
                    self._writer._fence()
                except BaseException:
                    self._sink.discard()
                    with self._writer._lock:
                        self._writer._entries.pop(self._rel, None)
                    raise
                with storage_errors(f"cannot write {self._writer.name}/{self._rel}"):
                    self._sink.close(digest)
                self.entry = self._writer._finish(self._rel, self._size, digest)
        finally:
            super().close()


def default_writer_info() -> dict[str, Any]:
    """Who writes, as the launcher's environment tells it (the Keras callbacks record
    their communicator's view instead)."""
    launch = launch_environment()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "rank": launch.rank,
        "world_size": launch.size,
        "backend": "local",
    }


def versions() -> dict[str, str]:
    from forge_dist import __version__

    return {"forge_dist": __version__, "python": platform.python_version()}
