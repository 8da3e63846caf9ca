"""``CheckpointStore``: atomic, verifiable checkpoints under any fsspec URL."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import platform
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from forge_dist._urls import redact_url
from forge_dist.errors import (
    ConfigurationError,
    IntegrityError,
    ManifestError,
    NoCheckpointError,
    StorageError,
)
from forge_dist.policy import check_mode, decide_retention
from forge_dist.storage import _faults
from forge_dist.storage._errors import describe, storage_errors
from forge_dist.storage.backends import Backend, make_backend, owner_is_dead, writer_id
from forge_dist.storage.manifest import (
    MANIFEST_NAME,
    STAGING_RE,
    FileEntry,
    Manifest,
    normalise_metrics,
    parse_manifest,
    parse_step_dirname,
    step_dirname,
    validate_relpath,
)

log = logging.getLogger("forge_dist.storage")

CHUNK = 4 * 1024 * 1024
_PIPELINE_MIN = 4 * CHUNK
#: Staging older than this (seconds) may belong to a dead writer on another host.
DEFAULT_GRACE_S = 3600.0

Progress = Callable[[int], None]


def _default_workers(n_items: int) -> int:
    return max(1, min(n_items, os.cpu_count() or 1, 8))


# --------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint. ``fatal=False`` only for unlisted files
    when not verifying strictly."""

    kind: str  # bad_manifest | missing | size_mismatch | hash_mismatch | unsafe_path |
    #            not_a_file | unlisted | io_error | uncommitted
    path: str | None
    message: str
    expected: Any = None
    actual: Any = None
    fatal: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "message": self.message,
            "expected": self.expected,
            "actual": self.actual,
            "fatal": self.fatal,
        }


@dataclass
class CheckpointReport:
    """The result of verifying one checkpoint folder."""

    name: str
    step: int | None
    mode: str  # "fast" | "full"
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "step": self.step,
            "mode": self.mode,
            "ok": self.ok,
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed step as listed: its manifest, or why it could not be read."""

    name: str
    step: int
    manifest: Manifest | None
    error: str | None = None

    @property
    def readable(self) -> bool:
        return self.manifest is not None

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.manifest.metrics if self.manifest else {}

    @property
    def state(self) -> Mapping[str, Any]:
        return self.manifest.state if self.manifest else {}


@dataclass(frozen=True)
class StagingInfo:
    """An unfinished save (``tmp``), an interrupted delete (``del``), or an object-store
    prefix without a manifest (``uncommitted``)."""

    name: str
    step: int | None
    kind: str
    age_s: float | None
    owner_dead: bool


@dataclass
class GcReport:
    deleted_steps: list[int] = field(default_factory=list)
    kept_steps: list[int] = field(default_factory=list)
    removed_staging: list[str] = field(default_factory=list)
    kept_staging: list[str] = field(default_factory=list)
    dry_run: bool = False


# --------------------------------------------------------------------------- hashing
def _read_chunks(f: IO[bytes], chunk: int = CHUNK) -> Iterator[bytes | memoryview]:
    buf = bytearray(chunk)
    view = memoryview(buf)
    readinto = getattr(f, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(view)
            if not n:
                return
            yield view[:n]
        else:
            data = f.read(chunk)
            if not data:
                return
            yield data


def hash_stream(f: IO[bytes], progress: Progress | None = None) -> tuple[int, str]:
    """``(size, sha256 hex)`` of everything left in ``f``."""
    h = hashlib.sha256()
    size = 0
    for block in _read_chunks(f):
        h.update(block)
        size += len(block)
        if progress:
            progress(len(block))
    return size, h.hexdigest()


# --------------------------------------------------------------------------- writer
class CheckpointWriter:
    """Stages one step; files are hashed as they are written. Use through
    :meth:`CheckpointStore.writer` as a context manager: leaving the block normally
    commits, an exception discards everything written."""

    def __init__(
        self,
        store: CheckpointStore,
        step: int,
        *,
        metrics: Mapping[str, float] | None,
        state: Mapping[str, Any] | None,
        writer: Mapping[str, Any] | None,
        replace: bool,
    ) -> None:
        self.store = store
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
        self._staging = self.store._backend.begin(self.step, self.replace)

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

    def _copy(self, rel: str, src: IO[bytes]) -> FileEntry:
        assert self._staging is not None
        sink = self.store._backend.open_write(self._staging, rel)
        h = hashlib.sha256()
        size = 0
        try:
            with storage_errors(f"cannot write {self.name}/{rel} in {self.store.display}"):
                for block in _read_chunks(src):
                    h.update(block)
                    sink.write(block)
                    size += len(block)
                sink.close()
        except BaseException:
            sink.discard()
            with self._lock:
                self._entries.pop(rel, None)
            raise
        return self._finish(rel, size, h.hexdigest())

    # -- adding payload
    def open(self, relpath: str) -> _HashingFile:
        """A write-only, non-seekable binary file at ``relpath``; its size and sha256 are
        computed as it is written (for serializers that write to a file object)."""
        rel = self._reserve(relpath)
        assert self._staging is not None
        sink = self.store._backend.open_write(self._staging, rel)
        return _HashingFile(self, rel, sink)

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
            return self._copy(rel, f)

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
        workers = max_workers or _default_workers(len(pairs))
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
            manifest = Manifest(
                step=self.step,
                files=tuple(self.files),
                writer=self.writer_info,
                metrics=normalise_metrics(self.metrics),
                state=self.state,
                versions=versions(),
            )
            data = manifest.to_bytes()
            self.store._backend.commit(self._staging, self.step, data, self.replace)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.committed = CheckpointInfo(self.name, self.step, manifest)
        # Tidy what dead writers on this host left behind (never a live writer's staging).
        try:
            self.store.cleanup_dead_writers()
        except StorageError as e:
            log.warning("could not clean up after dead writers in %s: %s", self.store.display, e)
        log.info(
            "committed %s in %s (%d files, %d bytes)",
            self.name,
            self.store.display,
            len(manifest.files),
            manifest.total_bytes,
        )
        return self.committed

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._staging is not None:
            self.store._backend.abort(self._staging)


class _HashingFile(io.RawIOBase):
    """What :meth:`CheckpointWriter.open` returns. Closing it records the file; an error
    while writing leaves it out (and the writer's block discards the staging)."""

    def __init__(self, writer: CheckpointWriter, rel: str, sink: Any) -> None:
        super().__init__()
        self._writer = writer
        self._rel = rel
        self._sink = sink
        self._hash = hashlib.sha256()
        self._size = 0
        self._failed = False
        self.entry: FileEntry | None = None

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
                if len(view) <= _PIPELINE_MIN:
                    self._sink.write(view)
                    self._hash.update(view)
                else:
                    self._pipelined(view)
        except BaseException:
            self._failed = True
            raise
        self._size += len(view)
        return len(view)

    def _pipelined(self, view: memoryview) -> None:
        """Hash chunk k on a helper thread while chunk k is written: for serializers that
        hand over hundreds of MB in one call, the hash costs almost no extra time."""
        pending = []
        with ThreadPoolExecutor(1, thread_name_prefix="forge-dist-hash") as pool:
            try:
                for start in range(0, len(view), CHUNK):
                    chunk = view[start : start + CHUNK]
                    pending.append(pool.submit(self._hash.update, chunk))
                    self._sink.write(chunk)
            finally:
                for f in pending:
                    f.result()

    def tell(self) -> int:
        return self._size

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._failed:
                self._sink.discard()
                with self._writer._lock:
                    self._writer._entries.pop(self._rel, None)
            else:
                with storage_errors(f"cannot write {self._writer.name}/{self._rel}"):
                    self._sink.close()
                self.entry = self._writer._finish(self._rel, self._size, self._hash.hexdigest())
        finally:
            super().close()


def default_writer_info() -> dict[str, Any]:
    env = os.environ

    def first_int(*names: str, default: int) -> int:
        for n in names:
            v = env.get(n)
            if v is not None and v.strip().isdigit():
                return int(v)
        return default

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "rank": first_int(
            "OMPI_COMM_WORLD_RANK", "PMI_RANK", "HOROVOD_RANK", "SLURM_PROCID", default=0
        ),
        "world_size": first_int(
            "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_SIZE", "SLURM_NTASKS", default=1
        ),
        "backend": "local",
    }


def versions() -> dict[str, str]:
    from forge_dist import __version__

    return {"forge_dist": __version__, "python": platform.python_version()}


# --------------------------------------------------------------------------- store
class CheckpointStore:
    """Atomic, verifiable checkpoints under one root URL.

    >>> store = CheckpointStore("s3://bucket/run1")          # doctest: +SKIP
    >>> with store.writer(12, metrics={"val_loss": 0.4}) as w:  # doctest: +SKIP
    ...     w.add_file("model.keras", "/tmp/model.keras")
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        if not isinstance(url, (str, os.PathLike)) or not os.fspath(url):
            raise ConfigurationError(f"checkpoint URL must be a non-empty string, got {url!r}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigurationError("storage_options must be a dict")
        self.url = os.fspath(url)
        self.display = redact_url(self.url)
        self._backend: Backend = make_backend(self.url, storage_options, self.display)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.display!r})"

    def root_exists(self) -> bool:
        """False only for a local root that does not exist yet (nothing saved there);
        object-store prefixes always "exist"."""
        return not self._backend.rename_commit or os.path.lexists(self._backend.root)

    @property
    def uses_rename(self) -> bool:
        """True on POSIX roots (rename commit), False on object stores (manifest last)."""
        return self._backend.rename_commit

    # -- listing
    def _committed_names(self) -> list[tuple[int, str]]:
        names = []
        for name, is_dir in self._backend.list_root():
            step = parse_step_dirname(name)
            if step is not None and is_dir:
                names.append((step, name))
        return sorted(names)

    def _load(self, step: int, name: str) -> CheckpointInfo | None:
        try:
            data = self._backend.read_manifest(name)
        except ManifestError as e:
            return CheckpointInfo(name, step, None, str(e))
        if data is None:
            return None
        try:
            manifest = parse_manifest(data)
        except ManifestError as e:
            return CheckpointInfo(name, step, None, str(e))
        if manifest.step != step:
            return CheckpointInfo(
                name, step, None, f"manifest says step {manifest.step}, folder is {name}"
            )
        return CheckpointInfo(name, step, manifest)

    def list(self) -> list[CheckpointInfo]:
        """Committed steps, oldest first; unreadable manifests are listed with ``error``."""
        out = []
        for step, name in self._committed_names():
            info = self._load(step, name)
            if info is not None:
                out.append(info)
        return out

    def steps(self) -> list[int]:
        return [c.step for c in self.list() if c.readable]

    def list_staging(self) -> list[StagingInfo]:
        """Unfinished saves and deletes (never trusted by readers)."""
        now = time.time()
        out = []
        for name, is_dir in self._backend.list_root():
            m = STAGING_RE.match(name)
            if m:
                mtime = self._backend.newest_mtime(name)
                out.append(
                    StagingInfo(
                        name,
                        int(m.group(1)),
                        m.group(2),
                        None if mtime is None else now - mtime,
                        owner_is_dead(m.group(3)),
                    )
                )
            elif (
                not self._backend.rename_commit and is_dir and parse_step_dirname(name) is not None
            ) and self._backend.read_manifest(name) is None:
                mtime = self._backend.newest_mtime(name)
                out.append(
                    StagingInfo(
                        name,
                        parse_step_dirname(name),
                        "uncommitted",
                        None if mtime is None else now - mtime,
                        False,
                    )
                )
        return out

    def get(self, step: int) -> CheckpointInfo:
        name = step_dirname(step)
        info = self._load(step, name)
        if info is None:
            raise NoCheckpointError(f"no committed {name} in {self.display}")
        return info

    def newest(self, verify: str | None = "fast") -> CheckpointInfo | None:
        """The newest committed step that verifies (``"fast"``, ``"full"`` or None for
        manifest only). Corrupt ones are skipped with a warning."""
        for info in reversed(self.list()):
            if self._usable(info, verify):
                return info
        return None

    def best(
        self, monitor: str, mode: str = "min", verify: str | None = "fast"
    ) -> CheckpointInfo | None:
        """The intact step with the best finite ``monitor`` (newest wins ties)."""
        check_mode(mode)
        sign = 1.0 if mode == "min" else -1.0
        candidates = [
            c for c in self.list() if c.readable and math.isfinite(c.metrics.get(monitor, math.nan))
        ]
        candidates.sort(key=lambda c: (sign * c.metrics[monitor], -c.step))
        for info in candidates:
            if self._usable(info, verify):
                return info
        return None

    def _usable(self, info: CheckpointInfo, verify: str | None) -> bool:
        if verify not in (None, "fast", "full"):
            raise ConfigurationError(f"verify must be None, 'fast' or 'full', got {verify!r}")
        if not info.readable:
            log.warning("skipping corrupt %s in %s: %s", info.name, self.display, info.error)
            return False
        if verify is None:
            return True
        report = self.verify(info.name, full=(verify == "full"))
        if not report.ok:
            first = next(p for p in report.problems if p.fatal)
            log.warning("skipping corrupt %s in %s: %s", info.name, self.display, first.message)
        return report.ok

    # -- verification
    def verify(
        self,
        name_or_step: str | int,
        *,
        full: bool = True,
        strict: bool = False,
        progress: Progress | None = None,
        workers: int | None = None,
    ) -> CheckpointReport:
        """Check one checkpoint folder against its manifest.

        ``full=False`` checks presence and sizes; ``full=True`` also hashes every byte
        (files in parallel). Unlisted files are problems, fatal only when ``strict``.
        Only paths the validator accepts are ever opened, and links are never followed.
        """
        name = step_dirname(name_or_step) if isinstance(name_or_step, int) else name_or_step
        step = parse_step_dirname(name)
        report = CheckpointReport(name, step, "full" if full else "fast")
        try:
            data = self._backend.read_manifest(name)
        except ManifestError as e:
            report.problems.append(Problem("bad_manifest", MANIFEST_NAME, str(e)))
            return report
        if data is None:
            report.problems.append(
                Problem(
                    "uncommitted", MANIFEST_NAME, f"{name} has no {MANIFEST_NAME}: not committed"
                )
            )
            return report
        try:
            manifest = parse_manifest(data)
        except ManifestError as e:
            report.problems.append(Problem("bad_manifest", MANIFEST_NAME, str(e)))
            return report
        if step is not None and manifest.step != step:
            report.problems.append(
                Problem(
                    "bad_manifest",
                    MANIFEST_NAME,
                    f"manifest says step {manifest.step} but the folder is {name}",
                    expected=step,
                    actual=manifest.step,
                )
            )
            return report
        report.step = manifest.step
        report.manifest = manifest
        to_hash: list[FileEntry] = []
        for entry in manifest.files:
            st = self._backend.stat(name, entry.path)
            if st is None:
                report.problems.append(
                    Problem("missing", entry.path, "file is missing", expected=entry.size)
                )
            elif st.symlink:
                report.problems.append(
                    Problem(
                        "unsafe_path",
                        entry.path,
                        "is (or lies under) a symbolic link; links are never followed",
                    )
                )
            elif not st.regular:
                report.problems.append(Problem("not_a_file", entry.path, "is not a regular file"))
            elif st.size != entry.size:
                report.problems.append(
                    Problem(
                        "size_mismatch",
                        entry.path,
                        f"size mismatch: expected {entry.size} bytes, found {st.size}",
                        expected=entry.size,
                        actual=st.size,
                    )
                )
            else:
                report.files_checked += 1
                if full:
                    to_hash.append(entry)
                else:
                    report.bytes_checked += entry.size
        listed = {e.path for e in manifest.files}
        for rel, st in sorted(self._backend.walk(name).items()):
            if rel not in listed:
                what = "symbolic link" if st.symlink else "file"
                report.problems.append(
                    Problem("unlisted", rel, f"unlisted {what} (not in the manifest)", fatal=strict)
                )
        if to_hash:
            self._hash_entries(name, to_hash, report, progress, workers)
        return report

    def _hash_entries(
        self,
        name: str,
        entries: list[FileEntry],
        report: CheckpointReport,
        progress: Progress | None,
        workers: int | None,
    ) -> None:
        def one(entry: FileEntry) -> Problem | None:
            try:
                with self._backend.open_read(name, entry.path) as f:
                    size, digest = hash_stream(f, progress)
            except StorageError as e:
                return Problem("io_error", entry.path, str(e))
            if size != entry.size:
                return Problem(
                    "size_mismatch",
                    entry.path,
                    f"size changed while reading: expected {entry.size}, read {size}",
                    expected=entry.size,
                    actual=size,
                )
            if digest != entry.sha256:
                return Problem(
                    "hash_mismatch",
                    entry.path,
                    "content differs from the manifest (sha256 mismatch)",
                    expected=entry.sha256,
                    actual=digest,
                )
            return None

        n = workers or _default_workers(len(entries))
        # Largest first keeps the pool busy until the end.
        ordered = sorted(entries, key=lambda e: -e.size)
        if n <= 1:
            results = [one(e) for e in ordered]
        else:
            with ThreadPoolExecutor(n, thread_name_prefix="forge-dist-hash") as pool:
                results = list(pool.map(one, ordered))
        for entry, problem in zip(ordered, results, strict=True):
            if problem is None:
                report.bytes_checked += entry.size
            else:
                report.problems.append(problem)
                report.files_checked -= 1
        report.problems.sort(key=lambda p: (p.path or "", p.kind))

    # -- writing
    def writer(
        self,
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        state: Mapping[str, Any] | None = None,
        writer: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> CheckpointWriter:
        """A :class:`CheckpointWriter` for ``step``; use it as a context manager."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigurationError(f"step must be a non-negative integer, got {step!r}")
        return CheckpointWriter(
            self, step, metrics=metrics, state=state, writer=writer, replace=replace
        )

    def put(
        self,
        src: str | os.PathLike[str],
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        state: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> CheckpointInfo:
        """Commit a local file or folder as ``step``."""
        src = os.fspath(src)
        if not os.path.lexists(src):
            raise StorageError(f"{src} does not exist")
        with self.writer(step, metrics=metrics, state=state, replace=replace) as w:
            if os.path.isdir(src) and not os.path.islink(src):
                w.add_tree(src)
            else:
                w.add_file(os.path.basename(src), src)
        assert w.committed is not None
        return w.committed

    def download(
        self, step: int | None, dest: str | os.PathLike[str], progress: Progress | None = None
    ) -> str:
        """Copy a committed step (newest intact one if ``step`` is None) into the local
        folder ``dest``, hashing as it goes. ``dest`` must not exist or be empty; it
        appears complete or not at all."""
        if step is None:
            info = self.newest(verify="fast")
            if info is None:
                raise NoCheckpointError(f"no intact committed checkpoint in {self.display}")
        else:
            info = self.get(step)
        if info.manifest is None:
            raise IntegrityError(f"{info.name} in {self.display} is corrupt: {info.error}")
        precheck = self.verify(info.name, full=False)
        if not precheck.ok:
            bad = [p for p in precheck.problems if p.fatal]
            raise IntegrityError(
                f"{info.name} in {self.display} is corrupt: "
                + "; ".join(f"{p.path}: {p.message}" for p in bad),
                bad,
            )
        dest = os.path.abspath(os.fspath(dest))
        if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
            raise StorageError(f"download destination {dest} exists and is not empty")
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        partial = f"{dest}.partial-{writer_id()}"
        os.mkdir(partial)
        problems: list[Problem] = []
        try:
            for entry in info.manifest.files:
                target = os.path.join(partial, *entry.path.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                h = hashlib.sha256()
                size = 0
                with (
                    self._backend.open_read(info.name, entry.path) as src,
                    open(target, "wb") as out,
                ):
                    for block in _read_chunks(src):
                        h.update(block)
                        out.write(block)
                        size += len(block)
                        if progress:
                            progress(len(block))
                if size != entry.size:
                    problems.append(
                        Problem(
                            "size_mismatch",
                            entry.path,
                            f"size mismatch: expected {entry.size} bytes, found {size}",
                            entry.size,
                            size,
                        )
                    )
                elif h.hexdigest() != entry.sha256:
                    problems.append(
                        Problem(
                            "hash_mismatch",
                            entry.path,
                            "content differs from the manifest (sha256 mismatch)",
                            entry.sha256,
                            h.hexdigest(),
                        )
                    )
            if problems:
                raise IntegrityError(
                    f"{info.name} in {self.display} failed verification while downloading: "
                    + "; ".join(f"{p.path}: {p.message}" for p in problems),
                    problems,
                )
            if os.path.isdir(dest):
                os.rmdir(dest)
            os.rename(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return dest

    # -- retention and cleanup
    def apply_retention(
        self,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        dry_run: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Delete committed steps beyond keep-last N / keep-best K; return (kept, deleted).

        The newest committed step is always kept, so this is safe to call right after
        a commit. Corrupt steps are neither counted nor deleted (they are reported by
        ``verify`` for a person to look at)."""
        if keep_best is not None and not monitor:
            raise ConfigurationError("keep_best needs monitor= (the metric to rank steps by)")
        infos = [c for c in self.list() if c.readable]
        metrics = {c.step: c.metrics.get(monitor) for c in infos} if monitor else None
        decision = decide_retention(
            [c.step for c in infos], metrics, keep_last=keep_last, keep_best=keep_best, mode=mode
        )
        deleted = []
        for step in decision.delete:
            if not dry_run:
                _faults.point(f"retention-delete:{step}")
                self._backend.delete_committed(step_dirname(step))
                log.info("retention deleted %s from %s", step_dirname(step), self.display)
            deleted.append(step)
        return list(decision.keep), deleted

    def gc(
        self,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        grace_s: float = DEFAULT_GRACE_S,
        dry_run: bool = False,
    ) -> GcReport:
        """Apply retention, then remove staging left by dead writers.

        A staging is removed when it is an interrupted delete, when its writer ran on
        this host and is gone, or when nothing in it changed for ``grace_s`` seconds;
        a live writer's staging is left alone."""
        if grace_s < 0:
            raise ConfigurationError(f"grace_s must be >= 0, got {grace_s}")
        report = GcReport(dry_run=dry_run)
        report.kept_steps, report.deleted_steps = self.apply_retention(
            keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode, dry_run=dry_run
        )
        report.removed_staging, report.kept_staging = self._remove_staging(
            lambda st: st.age_s is None or st.age_s > grace_s, dry_run
        )
        return report

    def cleanup_dead_writers(self) -> list[str]:
        """Remove staging whose writer is known dead (same host, pid gone) or was a delete."""
        return self._remove_staging(lambda st: False, dry_run=False)[0]

    def _remove_staging(
        self, stale: Callable[[StagingInfo], bool], dry_run: bool
    ) -> tuple[list[str], list[str]]:
        """Remove interrupted deletes, staging of dead local writers, and what ``stale``
        says; return (removed, kept)."""
        removed: list[str] = []
        kept: list[str] = []
        for st in self.list_staging():
            if not (st.kind == "del" or st.owner_dead or stale(st)):
                kept.append(st.name)
                continue
            if not dry_run:
                try:
                    self._backend.remove_uncommitted(st.name)
                except StorageError as e:
                    log.warning("could not remove %s: %s", st.name, e)
                    kept.append(st.name)
                    continue
            removed.append(st.name)
        return removed, kept
