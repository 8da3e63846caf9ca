"""``PreemptionCheckpoint``: one save and a clean exit on every rank when any rank is
told to stop (SLURM's warning signal, SIGTERM)."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from forge_dist import policy
from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras._state import registered, registry
from forge_dist.keras.callbacks.base import ForgeCallback
from forge_dist.keras.callbacks.checkpoint import ChiefModelCheckpoint
from forge_dist.preemption import DEFAULT_SIGNALS, PREEMPTED_EXIT_CODE, Preempted, shared_flag

#: The preemption notice, in seconds, when ``notice_s`` is not given.
NOTICE_ENV = "FORGE_DIST_PREEMPT_NOTICE_S"
_KEEP = 20  # saves' seconds kept in the state, for the next attempt's p95


class PreemptionCheckpoint(ForgeCallback):
    """Saves once and stops every rank when any rank gets a preemption signal.

    The handler only sets a flag. Every ``check_every_n_batches`` batches, and at each
    epoch end, the ranks agree whether any of them was signalled (one small all-reduce).
    ``"auto"`` checks every batch in the first epoch, then spaces the checks so they cost
    about 1 % of the step time while a signal is still acted on within about 10 s (or at
    the next batch, when a batch takes longer); the ranks agree on the spacing at each
    epoch end. If a rank was signalled, ``checkpoint``
    (a :class:`ChiefModelCheckpoint`) commits one checkpoint with the batch position and
    every callback's state, and every rank raises
    :class:`~forge_dist.preemption.Preempted` (a ``SystemExit`` with ``exit_code``,
    75 by default). The last batch of an epoch is checked when the epoch is complete
    (after every forge_dist callback's epoch end and the epoch's checkpoint, wherever
    this one stands in the list), so a save never falls between a finished epoch and
    its validation. Before saving, every forge_dist callback's
    ``on_preemption()`` runs (the TensorBoard logger copies its events to the URL).

    A signal that came before ``fit`` (call :func:`forge_dist.preemption.catch_early`
    first thing in the script, so it is held instead of ending the process) is acted on
    at train begin, before the first step: nothing new is saved, and every rank exits
    with 75 (the checkpoint it was restored from, if any, is the one to resume from).
    Resume with :func:`restore_latest` and :func:`fit_resumed`.

    ``notice_s`` (default: ``FORGE_DIST_PREEMPT_NOTICE_S``; the slurm/*.sbatch jobs set it
    to their ``--signal=B:USR1@N``) is how long the scheduler waits between its warning
    and the kill. The chief warns, once, when that cannot fit what acting on the warning
    takes: noticing it (the checks' spacing) plus a save at the p95 of the saves measured
    (this run's, and the earlier attempts' kept in the checkpoint's state, so a resumed
    job warns at train begin).
    """

    state_key = "preemption"
    complete_order = 2  # after the epoch's checkpoint

    def __init__(
        self,
        checkpoint: ChiefModelCheckpoint,
        signals: Any = None,
        check_every_n_batches: int | str = "auto",
        exit_code: int | None = None,
        communicator: Communicator | None = None,
        verbose: int = 1,
        notice_s: float | None = None,
    ) -> None:
        if not isinstance(checkpoint, ChiefModelCheckpoint):
            raise ConfigurationError(
                "checkpoint must be the ChiefModelCheckpoint that saves on preemption, "
                f"got {type(checkpoint).__name__}"
            )
        if checkpoint.filepath is not None:
            raise ConfigurationError(
                f"PreemptionCheckpoint saves into a checkpoint folder that a run resumes from; "
                f"{checkpoint.filepath!r} is a Keras file path. Give it a ChiefModelCheckpoint "
                "of a folder, or a BackupAndRestore"
            )
        super().__init__(communicator if communicator is not None else checkpoint.comm, verbose)
        n = check_every_n_batches
        if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigurationError(
                f"check_every_n_batches must be 'auto' or a positive int, got {n!r}"
            )
        code = PREEMPTED_EXIT_CODE if exit_code is None else exit_code
        if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
            raise ConfigurationError(f"exit_code must be an int in 1..255, got {exit_code!r}")
        self.notice_s = _notice_seconds(notice_s)
        self.checkpoint = checkpoint
        self.flag = shared_flag(DEFAULT_SIGNALS if signals is None else signals)
        self.check_every_n_batches = n
        self.every = 1 if n == "auto" else n  # batches between checks, now
        self.exit_code = code
        self._epoch = 0
        self._batches = 0
        self._steps: int | None = None
        self._timing = [0.0, 0, 0.0, 0]  # step seconds, steps, check seconds, checks
        self._t_last: float | None = None
        self._earlier_saves: list[float] = []  # seconds, from the attempts resumed
        self._earlier_step_s: float | None = None
        self._warned = False

    def get_state(self) -> dict[str, Any]:
        return {"save_s": self._saves()[-_KEEP:], "step_s": self._step_s(), "every": self.every}

    def set_state(self, state: dict[str, Any], weights: list[Any] | None = None) -> None:
        self._earlier_saves = [float(s) for s in state.get("save_s") or []]
        self._earlier_step_s = state.get("step_s")
        if self.check_every_n_batches == "auto" and state.get("every"):
            self.every = int(state["every"])

    def reset_state(self) -> None:
        self._earlier_saves, self._earlier_step_s = [], None

    def _saves(self) -> list[float]:
        return self._earlier_saves + self.checkpoint.save_seconds

    def _step_s(self) -> float | None:
        step_s, steps = self._timing[0], self._timing[1]
        return step_s / steps if steps else self._earlier_step_s

    def _check_notice(self, when: str) -> None:
        """Chief, once: warn when the notice cannot fit noticing it and a save."""
        if self._warned or self.notice_s is None or not self.comm.is_chief:
            return
        said = policy.notice_shortfall(self.notice_s, self._saves(), self.every, self._step_s())
        if said is not None:
            self._warned = True
            self._say(f"warning: {said} ({when})", logging.WARNING)

    def train_begin(self, logs: Any = None) -> None:
        self.begin_state()
        self.flag.install()
        self._steps = (self.params or {}).get("steps")
        if not registry(self.model).keep_state:  # (a fit that continues one: no new start)
            self._check_at_start()
        self._check_notice("from the saves of the attempts before this one")

    def _check_at_start(self) -> None:
        """A signal held since before fit: stop before the first step, saving nothing
        new (the model is where a checkpoint, or nothing, left it)."""
        name = "PreemptionCheckpoint(train begin)"
        if not self.comm.any(self.flag.raised, name=name):
            return
        got = self.comm.allgather(self.flag.received.name if self.flag.received else None, name)
        step = registry(self.model).restored_step
        stop = Preempted(
            self.exit_code, next(n for n in got if n), step, self._epoch, None, saved=False
        )
        self._say(f"{stop} (signalled before training began: {_who(got)})")
        self.flag.uninstall()
        raise stop

    def on_train_end(self, logs: Any = None) -> None:
        if not registry(self.model).partial_fit:
            self.flag.uninstall()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._batches = 0
        self._t_last = None

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        now = time.perf_counter()
        if self._t_last is not None:
            self._timing[0] += now - self._t_last
            self._timing[1] += 1
        self._batches += 1
        if (self._steps is None or batch + 1 < self._steps) and self._batches % self.every == 0:
            # (The last batch of an epoch is checked at the epoch end, after validation.)
            self._check(batch, epoch_done=False)
            self._timing[2] += time.perf_counter() - now
            self._timing[3] += 1
        self._t_last = time.perf_counter()

    def epoch_complete(self, epoch: int, logs: Any = None) -> None:
        if not self.model.stop_training:  # agreed on every rank; training ends anyway
            self._check(None, epoch_done=True)
        self._check_notice(f"measured by epoch {epoch + 1}")

    def _propose_every(self) -> int:
        """The spacing this rank would choose from what it measured (``"auto"``)."""
        step_s, steps, check_s, checks = self._timing
        if self.check_every_n_batches != "auto" or not steps or not checks:
            return self.every
        return policy.check_spacing(step_s / steps, check_s / checks)

    def _check(self, batch: int | None, epoch_done: bool) -> None:
        where = f"epoch {self._epoch}" + ("" if batch is None else f" batch {batch}")
        name = f"PreemptionCheckpoint({where})"
        if epoch_done:  # agree on the spacing in the same reduction: the largest proposed
            flag, every = self.comm.allreduce(
                [float(self.flag.raised), float(self._propose_every())], op="max", name=name
            )
            self.every, raised = int(every), flag > 0.5
        else:
            raised = self.comm.any(self.flag.raised, name=name)
        if not raised:
            return
        got = self.comm.allgather(
            self.flag.received.name if self.flag.received else None,
            name=f"PreemptionCheckpoint({where}) signals",
        )
        for cb in registered(self.model):
            cb.on_preemption()
        step = self.checkpoint.save_now(self._epoch, batch, epoch_done)
        position = None if batch is None else batch + registry(self.model).batch_offset
        stop = Preempted(self.exit_code, next(n for n in got if n), step, self._epoch, position)
        self._say(f"{stop} (signalled: {_who(got)})")
        self.flag.uninstall()  # fit ends here: on_train_end will not run
        raise stop


def _notice_seconds(notice_s: Any) -> float | None:
    """``notice_s``, else ``FORGE_DIST_PREEMPT_NOTICE_S``, checked (None: not known)."""
    where = "notice_s"
    if notice_s is None:
        notice_s = os.environ.get(NOTICE_ENV) or None
        where = NOTICE_ENV
        if notice_s is None:
            return None
    try:
        value = float(notice_s)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(notice_s, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(
            f"{where} must be a number of seconds > 0 (SLURM's --signal=USR1@N), got {notice_s!r}"
        )
    return value


def _who(got: list[Any]) -> str:
    return ", ".join(f"rank {r}: {n}" for r, n in enumerate(got) if n)
