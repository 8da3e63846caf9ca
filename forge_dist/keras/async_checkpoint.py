"""``AsyncCheckpointer``: one save at a time behind the training loop.

In the spirit of Orbax's ``AsyncCheckpointer``: the training side starts a save with
:meth:`save` and goes on; :meth:`wait_until_finished` blocks until it has committed;
:meth:`check_for_errors` raises a finished save's failure, once. Errors are never
swallowed, and a failed save leaves earlier checkpoints alone (the store commits
atomically). The thread is not a daemon, so interpreter exit waits for the commit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from forge_dist._background import lower_priority
from forge_dist.errors import ForgeDistError


class AsyncCheckpointer:
    """Runs ``save(fn)`` on one background thread at a time and keeps its error."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    @property
    def busy(self) -> bool:
        """True while a save is being written."""
        return self._thread is not None and self._thread.is_alive()

    def save(self, fn: Callable[[], None], what: str) -> None:
        """Start ``fn`` (the whole save: serialize, hash, commit) in the background.
        Call :meth:`wait_until_finished` first: only one save runs at a time."""
        if self.busy:
            raise RuntimeError("a background save is already running")  # a bug, not input
        self._what = what

        def run() -> None:
            try:
                lower_priority()
                fn()
            except BaseException as e:  # kept for the training loop to raise
                self._error = e

        self._thread = threading.Thread(target=run, name=f"forge-dist-save {what}")
        self._thread.start()

    def wait_until_finished(self) -> None:
        """Block until the save in flight (if any) has committed or failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check_for_errors(self) -> None:
        """Raise the failure of a finished save as :class:`ForgeDistError` (once); a
        save still running is not checked."""
        if self._error is not None and not self.busy:
            e, self._error = self._error, None
            raise ForgeDistError(f"background save of {self._what} failed: {e}") from e
