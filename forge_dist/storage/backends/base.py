"""The interface every commit protocol implements, and who owns a staging folder.

Both protocols speak in names relative to the root (``"step-00000012"``) and in
``/``-separated relative file paths already checked by ``validate_relpath``.
See docs/DESIGN.md, "Commit protocols".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, BinaryIO


@dataclass(frozen=True)
class FileStat:
    size: int
    symlink: bool = False  # the file, or a folder on its way, is a symbolic link
    regular: bool = True


class Sink(ABC):
    """A file being written: ``write`` bytes, then ``close`` makes it durable."""

    #: A file smaller than this goes out in one request; handed over as one ``bytes``
    #: (immutable: the sink keeps it instead of copying it), it costs no copy at all.
    whole_below = 0

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    @abstractmethod
    def close(self, sha256: str | None = None) -> None:
        """Make the file durable. ``sha256``: the hex digest of everything written, when
        the caller has it (a store that checks uploads end to end is given it)."""

    @abstractmethod
    def discard(self) -> None: ...


PROBE_PREFIX = ".forge-dist-probe-"
#: The writer lease: which writer generation may commit and delete in the root.
LEASE_NAME = "writer.lease"
LOCK_NAME = ".writer.lock"


def writer_id() -> str:
    """``<host>.<pid>.<random>``: names a staging folder and tells gc who owns it."""
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:60]
    return f"{host or 'host'}.{os.getpid()}.{secrets.token_hex(4)}"


def owner_is_dead(ident: str) -> bool:
    """True only when the staging's writer ran on this host and its pid is gone."""
    parts = ident.rsplit(".", 2)
    if len(parts) != 3:
        return False
    host, pid_text, _ = parts
    here = writer_id().rsplit(".", 2)[0]
    if host != here or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Backend(ABC):
    """What the store needs from a filesystem; one subclass per commit protocol."""

    display: str  # redacted URL of the root, for messages
    rename_commit: bool
    #: Files moved at once by a commit or a verify: None = one a core (disk and hashing
    #: bound); network stores wait on round trips, so more pay there.
    parallel_files: int | None = None

    @classmethod
    def prepare_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The storage options as this backend's client wants them (before the
        filesystem is made from them)."""
        return options

    @abstractmethod
    def check_root(self) -> None:
        """Raise StorageError if the root cannot be read (missing, a file, no permission)."""

    @abstractmethod
    def list_root(self) -> list[tuple[str, bool]]:
        """``(name, is_dir)`` for every entry directly under the root."""

    @abstractmethod
    def read_manifest(self, name: str) -> bytes | None:
        """Manifest bytes of ``name``, or None if it has none. Bounded in size."""

    @abstractmethod
    def stat(self, name: str, rel: str) -> FileStat | None:
        """Stat a file inside checkpoint ``name`` without following links; None if absent."""

    @abstractmethod
    def walk(self, name: str) -> dict[str, FileStat]:
        """Every file under ``name`` (links not followed), the top manifest excluded."""

    @abstractmethod
    def open_read(self, name: str, rel: str) -> BinaryIO: ...

    @abstractmethod
    def newest_mtime(self, name: str) -> float | None:
        """Newest modification time of anything under ``name`` (epoch seconds)."""

    # -- writing -------------------------------------------------------------
    @abstractmethod
    def begin(self, step: int, replace: bool) -> str:
        """Prepare a place to write ``step``; return its name (the staging)."""

    @abstractmethod
    def open_write(self, staging: str, rel: str) -> Sink: ...

    @abstractmethod
    def commit(self, staging: str, step: int, manifest: bytes, replace: bool) -> None:
        """Write the manifest and make ``step`` committed, atomically."""

    @abstractmethod
    def abort(self, staging: str) -> None:
        """Remove a staging that will never commit. Never raises."""

    @abstractmethod
    def delete_committed(self, name: str) -> None:
        """Uncommit ``name`` in one atomic operation, then remove its files."""

    @abstractmethod
    def remove_uncommitted(self, name: str) -> None:
        """Remove a staging (or an uncommitted prefix)."""

    @abstractmethod
    def probe(self) -> None:
        """Create the root if needed; write and remove a small file in it. Raise
        :class:`StorageError` if that fails (read-only, permission, missing bucket)."""

    def free_bytes(self) -> int | None:
        """Free space where the root lives, or None where storage has no such limit."""
        return None

    @abstractmethod
    def remove_root(self) -> None:
        """Remove the writer lease (and lock), then the root itself where it is a folder
        left empty; anything else in it stays."""

    # -- the writer lease (storage/lease.py) -----------------------------------
    @abstractmethod
    def read_lease(self) -> tuple[bytes | None, Any]:
        """The lease's bytes (None: no lease yet) and a token for a conditional write."""

    @abstractmethod
    def write_lease(self, data: bytes, token: Any) -> bool:
        """Replace the lease if it is still the one ``token`` names (None: there was
        none); False when another writer changed it first."""

    def locked(self) -> AbstractContextManager[None]:
        """Held around a lease check and the commit or delete it guards, where the
        storage can lock (POSIX); a no-op elsewhere."""
        return contextlib.nullcontext()

    conditional_writes: bool = True  # write_lease is a compare-and-swap
