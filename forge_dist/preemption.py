"""Preemption signals, caught safely (no TensorFlow, no I/O in the handler).

SLURM warns a job before its time limit or a preemption with a signal
(``#SBATCH --signal=B:USR1@120``), and ``scancel`` sends SIGTERM. A
:class:`SignalFlag` handler only records that a signal came; the training loop looks at
the flag between batches, the ranks agree (any rank's flag stops all), the chief saves
one checkpoint and every rank leaves with :data:`PREEMPTED_EXIT_CODE` by raising
:class:`Preempted`. Launch scripts requeue the job on that exit code.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from typing import Any

from forge_dist.errors import ConfigurationError

#: Exit status of a rank that saved and stopped because of a preemption signal: 75 is
#: ``EX_TEMPFAIL`` in sysexits.h ("temporary failure; the user is invited to retry").
PREEMPTED_EXIT_CODE = 75

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is committed.

    A :class:`SystemExit` (not an ``Exception``), like ``KeyboardInterrupt``: uncaught it
    ends the process with ``code`` (75 unless configured) and no traceback, and a broad
    ``except Exception`` in user code does not swallow it. Catch it by name to clean up.
    """

    def __init__(
        self,
        code: int,
        signal_name: str,
        step: int | None,
        epoch: int,
        batch: int | None,
        saved: bool = True,
    ):
        super().__init__(code)
        self.signal_name = signal_name
        self.step = step  # the checkpoint to resume from (None: there is none)
        self.epoch = epoch
        self.batch = batch
        self.saved = saved  # whether this preemption committed ``step``

    def __str__(self) -> str:
        if self.batch is None and self.step is not None and self.saved:
            what = f"saved step {self.step} (epoch {self.epoch + 1} end)"
        elif self.step is not None and self.saved:
            what = f"saved step {self.step} (epoch {self.epoch + 1}, batch {self.batch + 1})"
        elif self.step is not None:
            what = f"nothing new to save; the last checkpoint is step {self.step}"
        else:
            what = "nothing trained or saved yet"
        return (
            f"preempted by {self.signal_name}: {what}; exiting with {self.code} "
            "(resume with restore_latest and fit_resumed, e.g. scripts/train.py --resume; "
            "the sbatch scripts requeue on this exit code)"
        )


def parse_signals(signals: Iterable[str | int] | str | int) -> tuple[signal.Signals, ...]:
    """Names (``"SIGUSR1"``, ``"USR1"``) or numbers to signals; a clear error otherwise."""
    if isinstance(signals, (str, int)):
        signals = [signals]
    out: list[signal.Signals] = []
    for s in signals:
        try:
            if isinstance(s, bool):
                raise ValueError
            if isinstance(s, int):
                sig = signal.Signals(s)
            else:
                name = s.upper()
                sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except (KeyError, ValueError, AttributeError):
            raise ConfigurationError(f"not a signal: {s!r} (e.g. 'SIGUSR1', 'SIGTERM')") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigurationError(f"{sig.name} cannot be caught")
        if sig not in out:
            out.append(sig)
    if not out:
        raise ConfigurationError("give at least one signal to catch")
    return tuple(out)


class SignalFlag:
    """Catches ``signals``; the handler only records which came first.

    ``install()`` must run in the main thread (Python delivers signals there);
    ``uninstall()`` puts the previous handlers back. Both are idempotent.
    """

    def __init__(self, signals: Iterable[str | int] | str | int = DEFAULT_SIGNALS) -> None:
        self.signals = parse_signals(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def raised(self) -> bool:
        return self.received is not None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _handler(self, signum: int, frame: Any) -> None:
        # Only a plain assignment: no I/O, no locks, no allocation worth naming.
        if self.received is None:
            self.received = signal.Signals(signum)

    def install(self) -> None:
        if self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError(
                "preemption signals can only be caught from the main thread; call fit there"
            )
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    def clear(self) -> None:
        self.received = None


_early: SignalFlag | None = None


def catch_early(signals: Iterable[str | int] | str | int = DEFAULT_SIGNALS) -> SignalFlag:
    """Hold preemption signals from now on instead of letting them end the process.

    Call it first thing in a training script (before importing TensorFlow and
    restoring): a signal that comes before ``fit`` is then held, and
    :class:`~forge_dist.keras.PreemptionCheckpoint` acts on it at train begin, so the
    job still exits with 75. Main thread only; idempotent."""
    global _early
    wanted = parse_signals(signals)
    if _early is None or _early.signals != wanted:
        if _early is not None:
            _early.uninstall()
        _early = SignalFlag(wanted)
    elif not _early.installed:
        _early.clear()  # what it held was acted on when it was put away
    _early.install()
    return _early


def shared_flag(signals: Iterable[str | int] | str | int = DEFAULT_SIGNALS) -> SignalFlag:
    """The flag :func:`catch_early` installed, while it is installed and catches the
    same signals (so what it held counts); a new, not yet installed one otherwise."""
    wanted = parse_signals(signals)
    if _early is not None and _early.installed and _early.signals == wanted:
        return _early
    return SignalFlag(wanted)


__all__ = [
    "DEFAULT_SIGNALS",
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "SignalFlag",
    "catch_early",
    "parse_signals",
    "shared_flag",
]
