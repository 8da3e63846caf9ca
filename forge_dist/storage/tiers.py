"""Two checkpoint tiers: each step is committed to a fast root (a node-local disk, a
tmpfs) and copied from there, in the background and in the order committed, into the
durable root (NFS, a bucket), the manifest last, as every commit is.

A step is durable once its manifest is in the durable root, and not before. Until then
it is *pending*, and the fast root's retention keeps it (:attr:`Replicator.pending`):
a crash at any point between the tiers loses nothing already durable, and a step not
yet durable is still on the fast root, where a restore on the same node finds it and a
restart there copies it again (see ``docs/DESIGN.md``, "Two tiers"). Every byte copied
is hashed against the fast root's manifest while it is read (:func:`.transfer.copy_step`),
so a step damaged on the fast root never becomes durable.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from forge_dist._background import lower_priority
from forge_dist.errors import ForgeDistError
from forge_dist.storage import _faults
from forge_dist.storage.manifest import step_dirname
from forge_dist.storage.transfer import copy_step

if TYPE_CHECKING:
    from forge_dist.storage.lease import Lease
    from forge_dist.storage.store import CheckpointStore

log = logging.getLogger("forge_dist.storage")


class Replicator:
    """Copies committed steps of ``fast`` into ``durable`` on one background thread, one
    at a time, oldest first. ``lease`` fences the durable commits (see
    :meth:`CheckpointStore.take_lease`). A failed copy stops the thread and is raised
    by the next :meth:`check_for_errors` or :meth:`wait`; the steps it did not copy stay
    pending (the fast root keeps them)."""

    def __init__(
        self, fast: CheckpointStore, durable: CheckpointStore, lease: Lease | None = None
    ) -> None:
        self.fast, self.durable, self.lease = fast, durable, lease
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[int, bool, Callable[[], None] | None]] = (
            collections.deque()
        )
        self._pending: set[int] = set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        #: Seconds each copy took (this process), and the steps made durable, in order.
        self.copy_seconds: list[float] = []
        self.durable_steps: list[int] = []

    @property
    def pending(self) -> frozenset[int]:
        """Steps submitted and not durable yet: the fast root must keep them."""
        with self._cond:
            return frozenset(self._pending)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._thread is not None

    def submit(
        self, step: int, replace: bool = False, then: Callable[[], None] | None = None
    ) -> None:
        """Copy committed ``step`` of the fast root into the durable root after the steps
        submitted before it; ``replace`` lets it replace a different committed copy of
        that step there; ``then`` runs once it is durable (the durable root's
        retention), on the same thread. Call it right after the fast commit."""
        with self._cond:
            self._pending.add(step)
            self._queue.append((step, replace, then))
            if self._thread is None and self._error is None:
                self._thread = threading.Thread(target=self._run, name="forge-dist-replicate")
                self._thread.start()

    def wait(self) -> None:
        """Block until every submitted step is durable (or a copy failed: raised)."""
        with self._cond:
            while self._thread is not None:
                self._cond.wait()
        self.check_for_errors()

    def check_for_errors(self) -> None:
        """Raise a failed copy as :class:`ForgeDistError`, once; the steps it left stay
        pending, and the next :meth:`submit` starts over with them."""
        with self._cond:
            e, self._error = self._error, None
        if e is not None:
            raise ForgeDistError(
                f"copying a checkpoint from {self.fast.display} to {self.durable.display} "
                f"failed: {e}"
            ) from e

    def _run(self) -> None:
        lower_priority()
        while True:
            with self._cond:
                if not self._queue or self._error is not None:
                    self._thread = None
                    self._cond.notify_all()
                    return
                step, replace, then = self._queue[0]
            threading.current_thread().name = f"forge-dist-replicate step {step}"
            try:
                self._copy(step, replace)
                _faults.point(f"durable:{step}")
                with self._cond:
                    self._queue.popleft()
                    self._pending.discard(step)
                    self.durable_steps.append(step)
                if then is not None:
                    then()
            except BaseException as e:  # kept for the training loop to raise
                with self._cond:
                    self._error = e

    def _copy(self, step: int, replace: bool) -> None:
        """One step into the durable root, unless an identical copy is committed there."""
        t0 = time.perf_counter()
        there = self.durable.info(step_dirname(step))
        if there is not None and there.manifest is not None:
            here = self.fast.get(step)
            if here.manifest is not None and here.manifest.files == there.manifest.files:
                log.info("step %d is already durable in %s", step, self.durable.display)
                return
        _faults.point(f"copy:{step}")
        copy_step(self.fast, step, self.durable, replace=replace, lease=self.lease)
        self.copy_seconds.append(time.perf_counter() - t0)
        log.info("step %d is durable in %s", step, self.durable.display)
