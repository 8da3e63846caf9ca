"""``CheckpointStore``: atomic, verifiable checkpoints under any fsspec URL.

The one facade over the storage layer: listing (here), writing (:mod:`.writer`),
verification (:mod:`.verify`), retention and gc (:mod:`.retention`), through the commit
protocol of the URL (:mod:`.backends`). See docs/DESIGN.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

from forge_dist._urls import redact_url
from forge_dist.errors import (
    ConfigurationError,
    IntegrityError,
    ManifestError,
    NoCheckpointError,
    StorageError,
)
from forge_dist.policy import Retention, rank_best
from forge_dist.storage import lease as lease_mod
from forge_dist.storage import retention as retention_mod
from forge_dist.storage import transfer
from forge_dist.storage._errors import storage_errors
from forge_dist.storage.backends import Backend, make_backend, owner_is_dead, writer_id
from forge_dist.storage.hashing import Progress, read_all_hashed
from forge_dist.storage.lease import Lease
from forge_dist.storage.manifest import (
    STAGING_RE,
    parse_step_dirname,
    step_dirname,
    validate_relpath,
)
from forge_dist.storage.retention import DEFAULT_GRACE_S
from forge_dist.storage.types import CheckpointInfo, CheckpointReport, GcReport, StagingInfo
from forge_dist.storage.verify import content_problem, load_manifest, verify_checkpoint
from forge_dist.storage.writer import CheckpointWriter

log = logging.getLogger("forge_dist.storage")

VERIFY_LEVELS = (None, "fast", "full")


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

    def probe_writable(self) -> None:
        """Create the root if needed, write and remove a small file in it; a clear
        :class:`StorageError` if it cannot (read-only, permission, missing bucket)."""
        self._backend.probe()

    def free_bytes(self) -> int | None:
        """Free space where a local root lives; None on object stores."""
        return self._backend.free_bytes()

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

    def info(self, name: str) -> CheckpointInfo | None:
        """Folder ``name`` as listed (``error`` says why its manifest is unusable), or
        None when it holds no manifest (not committed)."""
        step = parse_step_dirname(name)
        try:
            manifest = load_manifest(self._backend, name)
        except ManifestError as e:
            return CheckpointInfo(name, -1 if step is None else step, None, str(e))
        if manifest is None:
            return None
        return CheckpointInfo(name, manifest.step if step is None else step, manifest)

    def is_committed(self, name: str) -> bool:
        """True when folder ``name`` holds a manifest (readable or not)."""
        try:
            return self._backend.read_manifest(name) is not None
        except ManifestError:
            return True

    def list(self) -> list[CheckpointInfo]:
        """Committed steps, oldest first; unreadable manifests are listed with ``error``."""
        return [info for _, name in self._committed_names() if (info := self.info(name))]

    def steps(self) -> list[int]:
        return [c.step for c in self.list() if c.readable]

    def list_staging(self) -> list[StagingInfo]:
        """Unfinished saves and deletes, and step folders without a manifest (never
        trusted by readers)."""
        now = time.time()
        out = []
        for name, is_dir in self._backend.list_root():
            m = STAGING_RE.match(name)
            if m:
                step, kind, owner_dead = int(m.group(1)), m.group(2), owner_is_dead(m.group(3))
            elif (is_dir and parse_step_dirname(name) is not None) and self._backend.read_manifest(
                name
            ) is None:
                # Object stores: a save cut off before its manifest. A POSIX root never has
                # one (a save is renamed in with its manifest): there, the manifest is gone.
                kind = "orphan" if self._backend.rename_commit else "uncommitted"
                step, owner_dead = parse_step_dirname(name), False
            else:
                continue
            mtime = self._backend.newest_mtime(name)
            age = None if mtime is None else now - mtime
            out.append(StagingInfo(name, step, kind, age, owner_dead))
        return out

    def get(self, step: int) -> CheckpointInfo:
        name = step_dirname(step)
        info = self.info(name)
        if info is None:
            raise NoCheckpointError(f"no committed {name} in {self.display}")
        return info

    def newest(self, verify: str | None = "fast") -> CheckpointInfo | None:
        """The newest committed step that verifies (``"fast"``, ``"full"`` or None for
        manifest only). Corrupt ones are skipped with a warning."""
        for info in reversed(self.list()):
            if self.is_intact(info, verify):
                return info
        return None

    def best(
        self, monitor: str, mode: str = "min", verify: str | None = "fast"
    ) -> CheckpointInfo | None:
        """The intact step with the best finite ``monitor`` (newest wins ties)."""
        infos = {c.step: c for c in self.list() if c.readable}
        for step in rank_best({s: c.metrics.get(monitor) for s, c in infos.items()}, mode):
            if self.is_intact(infos[step], verify):
                return infos[step]
        return None

    def is_intact(self, info: CheckpointInfo, verify: str | None = "fast") -> bool:
        """True when ``info``'s manifest is readable and (``verify``) its files match it;
        a corrupt step is logged as skipped."""
        if verify not in VERIFY_LEVELS:
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
        """Check one checkpoint folder against its manifest (see :mod:`.verify`)."""
        name = step_dirname(name_or_step) if isinstance(name_or_step, int) else name_or_step
        return verify_checkpoint(
            self._backend, name, full=full, strict=strict, progress=progress, workers=workers
        )

    # -- writing
    def writer(
        self,
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        state: Mapping[str, Any] | None = None,
        writer: Mapping[str, Any] | None = None,
        replace: bool = False,
        run: Mapping[str, Any] | None = None,
        lease: Lease | None = None,
        created: str | None = None,
    ) -> CheckpointWriter:
        """A :class:`CheckpointWriter` for ``step``; use it as a context manager.
        ``run`` identifies the run that writes it (see :class:`Manifest`); with
        ``lease`` (:meth:`take_lease`) the commit happens only while that writer
        generation still holds the root."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigurationError(f"step must be a non-negative integer, got {step!r}")
        return CheckpointWriter(
            self._backend,
            self.display,
            step,
            metrics=metrics,
            state=state,
            writer=writer,
            replace=replace,
            # Tidy what dead writers on this host left behind (never a live one's staging).
            after_commit=self.cleanup_dead_writers,
            run=run,
            lease=lease,
            created=created,
        )

    def put(
        self,
        src: str | os.PathLike[str],
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        state: Mapping[str, Any] | None = None,
        replace: bool = False,
        name: str | None = None,
    ) -> CheckpointInfo:
        """Commit a local file (as ``name``, default its own) or folder as ``step``."""
        src = os.fspath(src)
        if not os.path.lexists(src):
            raise StorageError(f"{src} does not exist")
        with self.writer(step, metrics=metrics, state=state, replace=replace) as w:
            if os.path.isdir(src) and not os.path.islink(src):
                w.add_tree(src)
            else:
                w.add_file(name or os.path.basename(src), src)
        assert w.committed is not None
        return w.committed

    # -- reading back
    def open_file(self, name_or_step: str | int, path: str) -> BinaryIO:
        """A committed step's file, opened for reading (links never followed)."""
        name = step_dirname(name_or_step) if isinstance(name_or_step, int) else name_or_step
        return self._backend.open_read(name, validate_relpath(path))

    def read_verified(
        self, step: str | int | CheckpointInfo, path: str, direct: bool = True
    ) -> memoryview:
        """One file of a committed step (its name, number, or its listed info, whose
        manifest is then not read again), read once into memory and hashed while read;
        :class:`IntegrityError` unless it matches the step's manifest. ``direct=False``:
        a local file through the page cache (see :func:`.hashing.read_all_hashed`)."""
        if isinstance(step, CheckpointInfo):
            name, info = step.name, step
        else:
            name = step_dirname(step) if isinstance(step, int) else step
            info = self.info(name)
        if info is None or info.manifest is None:
            raise IntegrityError(f"{name} in {self.display} has no readable manifest")
        entry = next((e for e in info.manifest.files if e.path == path), None)
        if entry is None:
            raise IntegrityError(f"{name} in {self.display} lists no file {path}")
        with self.open_file(name, path) as f:
            buf, size, digest = read_all_hashed(f, entry.size, direct=direct)
        problem = content_problem(entry, size, digest)
        if problem is not None:
            raise IntegrityError(
                f"{name}/{path} in {self.display} is corrupt: {problem.message}", [problem]
            )
        return buf

    def copy_to(self, dst: CheckpointStore, step: int, replace: bool = False) -> CheckpointInfo:
        """Copy committed ``step`` into ``dst`` (see :mod:`.transfer`)."""
        return transfer.copy_step(self, step, dst, replace)

    def download(
        self, step: int | None, dest: str | os.PathLike[str], progress: Progress | None = None
    ) -> str:
        """Copy a committed step (newest intact one if ``step`` is None) into the local
        folder ``dest``, hashing as it goes (see :func:`.transfer.download`). ``dest``
        must not exist or be empty; it appears complete or not at all."""
        return transfer.download(self, step, dest, progress)

    # -- deleting
    def take_lease(self, run: str | None = None) -> Lease:
        """Become the root's writer: the next writer generation (see :mod:`.lease`)."""
        return lease_mod.take(self._backend, run)

    def lease(self) -> Lease | None:
        """The root's current writer lease (None: nobody took one)."""
        return lease_mod.read(self._backend)[0]

    def delete(self, step: int, lease: Lease | None = None) -> None:
        """Uncommit ``step`` in one atomic operation, then remove its files; with
        ``lease``, only while that writer generation holds the root."""
        name = step_dirname(step)
        if not self.is_committed(name):
            raise NoCheckpointError(f"no committed {name} in {self.display}")
        with lease_mod.guarded(self._backend, lease):
            self._backend.delete_committed(name)
        log.info("deleted %s from %s", name, self.display)

    def remove_root(self) -> None:
        """Once its steps are deleted: the writer lease goes, then the root itself where
        it is a folder left empty (files that are not the store's stay)."""
        self._backend.remove_root()

    def archive_steps(self, steps: list[int]) -> str:
        """Move committed ``steps`` into a new ``archive-<time>`` folder in the root
        (where readers do not look); return its name. Local roots only: on object
        stores a move is a copy, so delete the steps or choose another root."""
        if not self._backend.rename_commit:
            raise ConfigurationError(
                f"archiving steps needs a local root ({self.display} is an object store, "
                "where moving is copying): delete them, or write to another directory"
            )
        folder = f"archive-{time.strftime('%Y%m%d-%H%M%S')}-{writer_id()}"
        root = self._backend.root
        with storage_errors(f"cannot archive steps in {self.display}"):
            os.mkdir(os.path.join(root, folder))
            for step in steps:
                name = step_dirname(step)
                os.rename(os.path.join(root, name), os.path.join(root, folder, name))
        log.info("archived %d step(s) of %s into %s", len(steps), self.display, folder)
        return folder

    def remove_staging(self, name: str) -> None:
        """Remove an unfinished save, an interrupted delete or an uncommitted prefix."""
        if STAGING_RE.match(name) is None and parse_step_dirname(name) is None:
            raise ConfigurationError(f"{name!r} is not a staging folder name")
        if parse_step_dirname(name) is not None and self.is_committed(name):
            raise ConfigurationError(f"{name} is committed; delete it by its step instead")
        self._backend.remove_uncommitted(name)

    def apply_retention(
        self,
        retention: Retention,
        *,
        dry_run: bool = False,
        protect: Sequence[int] = (),
        run_id: str | None = None,
        lease: Lease | None = None,
        protect_epochs: Sequence[int] = (),
    ) -> tuple[list[int], list[int]]:
        """Delete committed steps ``retention`` (:class:`forge_dist.policy.Retention`)
        does not keep; return (kept, deleted). The newest committed step and ``protect``
        are always kept, so this is safe to call right after a commit, and so is the
        newest step of each epoch end in ``protect_epochs``; with ``run_id`` only that
        run's steps count; with ``lease`` nothing is deleted once a newer writer holds
        the root."""
        return retention_mod.apply_retention(
            self,
            retention,
            dry_run=dry_run,
            protect=protect,
            run_id=run_id,
            lease=lease,
            protect_epochs=protect_epochs,
        )

    def gc(
        self,
        retention: Retention | None = None,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        dry_run: bool = False,
        strict: bool = False,
    ) -> GcReport:
        """Apply ``retention`` (none: keep every step), then remove staging left by dead
        writers (see :func:`forge_dist.storage.retention.gc`); ``strict`` raises an I/O
        error instead of reporting that staging as kept."""
        return retention_mod.gc(self, retention, grace_s=grace_s, dry_run=dry_run, strict=strict)

    def cleanup_dead_writers(self) -> list[str]:
        """Remove staging whose writer is known dead (same host, pid gone) or was a delete.

        Run after every commit. Object stores have neither: the payload goes straight
        under ``step-N/``, whose writer is never known dead (``gc`` removes such a prefix
        once it is stale), so there it costs nothing instead of a LIST of the root and
        a manifest read per step."""
        if not self._backend.rename_commit:
            return []
        return retention_mod.remove_staging(self, lambda st: False, dry_run=False)[0]
