"""Fencing: at most one writer generation per checkpoint root.

A writer takes the root's lease (``writer.lease``) by raising its generation: a
compare-and-swap, under an exclusive lock on POSIX roots and through a conditional
write on the clouds (S3 and Azure Blob: ``If-Match`` / ``If-None-Match``; GCS:
``ifGenerationMatch``). Before every commit and every delete, at
the begin of a save and before each of its files becomes visible, the writer checks that
the lease still holds its generation; an older one (a job that ``scontrol requeue``
restarted while the old attempt still runs, a partitioned node) gets
:class:`~forge_dist.errors.StaleWriterError`, commits nothing, and the newer writer's
steps are untouched. It cleans its POSIX staging; on object stores, where its files are
under the step's own prefix and the newer writer may be writing the same step, it
leaves them (to the newer writer's begin of that step, or to ``gc``).

POSIX: the check and the commit (or delete) happen under the same lock, so a stale
writer can never commit. Object stores have no transaction over two objects: the check
is made before the manifest PUT and again after it, and a commit that raced a takeover
is withdrawn at once (a reader may see it for that moment). Likewise a file whose PUT
was already on its way when the lease changed hands can land on the newer step (the
window is one request; a store's conditional PUT would close it). Stores without conditional
writes (``memory://``, any fsspec protocol without a backend of its own) take the lease
by a plain write: the last writer to take it wins.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from forge_dist.errors import StaleWriterError, StorageError
from forge_dist.storage.backends import Backend, writer_id

T = TypeVar("T")
ATTEMPTS = 20


@dataclass(frozen=True)
class Lease:
    generation: int
    run: str | None
    holder: str  # <host>.<pid>.<random>
    taken: str  # ISO-8601 UTC

    def to_bytes(self) -> bytes:
        doc = {
            "generation": self.generation,
            "run": self.run,
            "holder": self.holder,
            "taken": self.taken,
        }
        return (json.dumps(doc, indent=1) + "\n").encode()

    def describe(self) -> str:
        run = f"run {self.run}, " if self.run else ""
        return f"generation {self.generation} ({run}{self.holder}, taken {self.taken[:19]}Z)"


def read(backend: Backend) -> tuple[Lease | None, Any]:
    data, token = backend.read_lease()
    if data is None:
        return None, None
    try:
        doc = json.loads(data)
        lease = Lease(int(doc["generation"]), doc.get("run"), str(doc["holder"]), str(doc["taken"]))
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(f"the writer lease of {backend.display} is damaged: {e}") from e
    return lease, token


def take(backend: Backend, run: str | None) -> Lease:
    """Raise the root's writer generation by one and hold it."""
    for _ in range(ATTEMPTS):
        with backend.locked():
            current, token = read(backend)
            mine = Lease(
                (current.generation if current else 0) + 1,
                run,
                writer_id(),
                datetime.now(timezone.utc).isoformat(),
            )
            if backend.write_lease(mine.to_bytes(), token):
                return mine
    raise StorageError(
        f"could not take the writer lease of {backend.display}: {ATTEMPTS} other writers "
        "took it first"
    )


def check(backend: Backend, lease: Lease) -> None:
    """Raise :class:`StaleWriterError` unless ``lease`` still holds the root."""
    current, _ = read(backend)
    if current is None or current.generation == lease.generation:
        return  # (a lease removed by hand fences nobody)
    raise StaleWriterError(
        f"a newer writer took over {backend.display} ({current.describe()}); this one "
        f"({lease.describe()}) may no longer commit or delete there: nothing was "
        "written. Only the newest job attempt writes to a checkpoint root"
    )


@contextmanager
def guarded(backend: Backend, lease: Lease | None) -> Iterator[None]:
    """Around a commit or a delete: the lease checked, under the lock where there is
    one."""
    if lease is None:
        yield
        return
    with backend.locked():
        check(backend, lease)
        yield


def after(backend: Backend, lease: Lease | None, undo: Callable[[], T]) -> None:
    """Object stores: a commit that raced a takeover is withdrawn (``undo``) and the
    stale writer told so."""
    if lease is None or backend.rename_commit:
        return
    try:
        check(backend, lease)
    except StaleWriterError:
        undo()
        raise
