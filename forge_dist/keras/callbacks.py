"""Keras callbacks that agree across ranks (Keras 3 and tf_keras).

Each callback gathers its facts, lets the chief decide with :mod:`forge_dist.policy`,
broadcasts the decision (or the error) and applies it on every rank in the same epoch.
Every rank makes the same collective calls in the same order; a configuration error is
raised on every rank, never as a warning on one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from forge_dist import policy
from forge_dist.comm import Communicator, get_communicator
from forge_dist.errors import CollectiveMismatchError, ConfigurationError, ForgeDistError
from forge_dist.keras import _compat
from forge_dist.keras._compat import Callback, to_float
from forge_dist.keras._state import collect_state, register, registry, take_pending

log = logging.getLogger("forge_dist.keras")


def _resolve_comm(communicator: Communicator | None) -> Communicator:
    return communicator if communicator is not None else get_communicator("auto")


def check_keras_supports(comm: Communicator) -> None:
    """Keras 3 does not train under MultiWorkerMirroredStrategy: say so at construction,
    on every worker, instead of failing deep inside fit."""
    if getattr(comm, "multi_worker", False) and _compat.FLAVOR == "keras3":
        raise ConfigurationError(
            "Keras 3 does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585: "
            "model.fit fails converting PerReplica values). Set TF_USE_LEGACY_KERAS=1 to use "
            "tf_keras, or launch with Horovod (scripts/launch_horovod.sh)."
        )


def _check_mode_arg(mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ConfigurationError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    return mode


def _try_resolve(monitor: str, mode: str) -> str | None:
    try:
        return policy.resolve_mode(monitor, mode)
    except ConfigurationError:
        return None


class _ForgeCallback(Callback):
    """Shared plumbing: communicator, registration, printing on the chief only."""

    state_key = "callback"

    def __init__(self, communicator: Communicator | None = None, verbose: int = 0) -> None:
        super().__init__()
        self.comm = _resolve_comm(communicator)
        check_keras_supports(self.comm)
        self.verbose = verbose
        self.state_key_unique = self.state_key

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self.state_key_unique = register(model, self)

    def _say(self, message: str) -> None:
        log.info(message)
        if self.verbose and self.comm.is_chief:
            print(f"[forge_dist] {message}", flush=True)

    def _agree(self, name: str, decide: Callable[[], Any]) -> Any:
        """Run ``decide`` on the chief, broadcast its result or its error; raise the
        same error on every rank."""
        payload: Any = None
        failure: BaseException | None = None
        if self.comm.is_chief:
            try:
                payload = ("ok", decide())
            except Exception as e:  # every rank must hear of it, not just the chief
                failure = e
                payload = ("error", type(e).__name__, str(e))
        payload = self.comm.broadcast(payload, name=name)
        if payload[0] == "error":
            if failure is not None:
                raise failure
            cls = ConfigurationError if payload[1] == "ConfigurationError" else ForgeDistError
            raise cls(f"{name} failed on rank 0: {payload[1]}: {payload[2]}")
        return payload[1]

    def _resolve_mode(self, monitor: str, mode: str) -> str:
        direction = _compat.metric_direction(self.model, monitor) if mode == "auto" else None
        return policy.resolve_mode(monitor, mode, direction)

    def _setup_monitor(self, monitor: str, mode: str) -> str | None:
        """Check ``monitor``/``mode`` now; return the mode if the name decides it (else
        it is resolved from the model's metrics in ``on_train_begin``)."""
        policy.check_monitor(monitor)
        self.monitor = monitor
        self.mode = _check_mode_arg(mode)
        resolved = _try_resolve(monitor, mode)
        self._mode_resolved = resolved is not None
        return resolved

    def _finish_mode(self) -> None:
        if not self._mode_resolved:
            mode = self._resolve_mode(self.monitor, self.mode)
            self.config = dataclasses.replace(self.config, mode=mode)
            self._mode_resolved = True


def _missing_monitor(monitor: str, logs: dict[str, Any], who: str) -> ConfigurationError:
    keys = ", ".join(sorted(logs)) or "none"
    return ConfigurationError(
        f"{who}: monitor {monitor!r} is not in the logs (available: {keys}); "
        "check the metric name, and that validation data is passed to fit"
    )


# --------------------------------------------------------------------------- SyncMetrics
class SyncMetrics(_ForgeCallback):
    """Replaces every numeric value in ``logs`` by its mean across ranks.

    Validation values (``val_*``, and everything in ``evaluate``) are weighted by each
    rank's number of validation samples when ``validation_samples`` is given (an int or a
    callable returning one). Keys are reduced in sorted order; a rank with a different
    set of keys is an error on every rank. Put it first: :func:`production_callbacks`
    does.
    """

    state_key = "sync_metrics"

    def __init__(
        self,
        communicator: Communicator | None = None,
        validation_samples: int | Callable[[], int] | None = None,
    ) -> None:
        super().__init__(communicator)
        if validation_samples is not None and not callable(validation_samples):
            if isinstance(validation_samples, bool) or not isinstance(validation_samples, int):
                raise ConfigurationError("validation_samples must be an int, a callable or None")
            if validation_samples < 0:
                raise ConfigurationError("validation_samples must be >= 0")
        self.validation_samples = validation_samples
        self._in_fit = False

    def _weight(self) -> float | None:
        v = self.validation_samples
        if v is None:
            return None
        return float(v() if callable(v) else v)

    def on_train_begin(self, logs: Any = None) -> None:
        self._in_fit = True

    def on_train_end(self, logs: Any = None) -> None:
        self._in_fit = False

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is not None:
            self.sync(logs, f"SyncMetrics(epoch {epoch})", weight_all=False)

    def on_test_end(self, logs: Any = None) -> None:
        if logs is not None and not self._in_fit:
            self.sync(logs, "SyncMetrics(evaluate)", weight_all=True)

    def sync(self, logs: dict[str, Any], name: str, weight_all: bool) -> None:
        numeric = {k: f for k in sorted(logs) if (f := to_float(logs[k])) is not None}
        keys = tuple(numeric)
        rows = self.comm.allgather((keys, [numeric[k] for k in keys], self._weight()), name=name)
        key_sets = {r: row[0] for r, row in enumerate(rows)}
        if len(set(key_sets.values())) > 1:
            ref = key_sets[0]
            diffs = [
                f"rank {r}: {sorted(set(k) ^ set(ref))}" for r, k in key_sets.items() if k != ref
            ]
            raise CollectiveMismatchError(
                f"{name}: ranks logged different metrics (differences from rank 0: "
                + "; ".join(diffs)
                + ")"
            )
        values = np.array([row[1] for row in rows], dtype=np.float64).reshape(len(rows), -1)
        weights = [row[2] for row in rows]
        plain = values.sum(axis=0) / len(rows)
        if all(w is not None for w in weights) and sum(weights) > 0:
            w = np.array(weights, dtype=np.float64)[:, None]
            weighted = (values * w).sum(axis=0) / w.sum()
        else:
            weighted = plain
        for i, k in enumerate(keys):
            use_weight = weight_all or k.startswith("val_")
            logs[k] = float(weighted[i] if use_weight else plain[i])


# --------------------------------------------------------------------------- early stop
class SyncEarlyStopping(_ForgeCallback):
    """Keras' ``EarlyStopping``, decided once and applied on every rank in the same epoch.

    With ``restore_best_weights=True`` every rank ends with the chief's best weights.
    """

    state_key = "early_stopping"

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator, verbose)
        resolved = self._setup_monitor(monitor, mode)
        # Validates every number now, on every rank; the mode may wait for the model.
        self.config = policy.EarlyStopConfig(
            monitor=monitor,
            mode=resolved or "min",
            min_delta=min_delta,
            patience=patience,
            baseline=baseline,
            start_from_epoch=start_from_epoch,
            restore_best_weights=bool(restore_best_weights),
        )
        self.state = policy.EarlyStopState()
        self.best_weights: list[Any] | None = None
        self.patience = patience
        self.restore_best_weights = restore_best_weights

    # Keras-compatible read-only views
    @property
    def wait(self) -> int:
        return self.state.wait

    @property
    def best(self) -> float | None:
        return self.state.best

    @property
    def stopped_epoch(self) -> int:
        return self.state.stopped_epoch

    @property
    def best_epoch(self) -> int:
        return self.state.best_epoch

    def get_state(self) -> dict[str, Any]:
        return {"mode": self.config.mode, **self.state.to_json()}

    def on_train_begin(self, logs: Any = None) -> None:
        self._finish_mode()
        if registry(self.model).keep_state:
            return
        restored = take_pending(self.model, self.state_key_unique)
        self.state = (
            policy.EarlyStopState.from_json(restored) if restored else policy.EarlyStopState()
        )
        self.best_weights = None
        if restored and self.state.has_best_weights:
            best = take_pending(self.model, f"{self.state_key_unique}:best_weights")
            if best is not None:
                self.best_weights = best
            else:
                self.state = policy.EarlyStopState(
                    **{**self.state.__dict__, "has_best_weights": False}
                )

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs = logs or {}

        def decide() -> policy.EarlyStopDecision:
            current = to_float(logs.get(self.monitor))
            if current is None and epoch >= self.config.start_from_epoch:
                raise _missing_monitor(self.monitor, logs, "SyncEarlyStopping")
            return policy.early_stop_step(self.config, self.state, epoch, current)

        decision = self._agree(f"SyncEarlyStopping(epoch {epoch})", decide)
        self.state = decision.state
        # Under MultiWorkerMirroredStrategy reading variables may need every worker.
        symmetric = getattr(self.comm, "collective_saves", False)
        if decision.snapshot_weights and (self.comm.is_chief or symmetric):
            self.best_weights = self.model.get_weights()
        if decision.stop:
            self.model.stop_training = True
        if decision.message and (decision.stop or self.verbose > 1):
            self._say(decision.message)

    def on_train_end(self, logs: Any = None) -> None:
        if registry(self.model).partial_fit and not self.model.stop_training:
            return  # fit_resumed: training goes on in the next fit
        if self.state.stopped_epoch > 0:
            self._say(f"Epoch {self.state.stopped_epoch + 1}: early stopping")
        if self.config.restore_best_weights and self.state.has_best_weights:
            weights = self.comm.broadcast(
                self.best_weights if self.comm.is_chief else None,
                name="SyncEarlyStopping(restore_best_weights)",
            )
            if weights is not None:
                self.model.set_weights(weights)
                self._say(
                    "restored the weights from the end of the best epoch: "
                    f"{self.state.best_epoch + 1}"
                )


# --------------------------------------------------------------------------- plateau
class SyncReduceLROnPlateau(_ForgeCallback):
    """Keras' ``ReduceLROnPlateau``; every rank holds the same learning rate after every
    epoch (the chief's), and ``logs["learning_rate"]`` shows it."""

    state_key = "reduce_lr"

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator, verbose)
        resolved = self._setup_monitor(monitor, mode)
        self.config = policy.PlateauConfig(
            monitor=monitor,
            mode=resolved or "min",
            factor=factor,
            patience=patience,
            min_delta=min_delta,
            cooldown=cooldown,
            min_lr=min_lr,
        )
        self.state = policy.PlateauState()

    @property
    def wait(self) -> int:
        return self.state.wait

    @property
    def cooldown_counter(self) -> int:
        return self.state.cooldown_counter

    @property
    def best(self) -> float | None:
        return self.state.best

    def get_state(self) -> dict[str, Any]:
        return {"mode": self.config.mode, **self.state.to_json()}

    def on_train_begin(self, logs: Any = None) -> None:
        self._finish_mode()
        _compat.get_lr(self.model.optimizer)  # fails early, on every rank, without one
        if registry(self.model).keep_state:
            return
        restored = take_pending(self.model, self.state_key_unique)
        self.state = policy.PlateauState.from_json(restored) if restored else policy.PlateauState()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs = logs if logs is not None else {}

        def decide() -> tuple[policy.PlateauDecision, float]:
            current = to_float(logs.get(self.monitor))
            if current is None:
                raise _missing_monitor(self.monitor, logs, "SyncReduceLROnPlateau")
            lr = _compat.get_lr(self.model.optimizer)
            return policy.plateau_step(self.config, self.state, epoch, current, lr), lr

        decision, chief_lr = self._agree(f"SyncReduceLROnPlateau(epoch {epoch})", decide)
        self.state = decision.state
        lr = decision.new_lr if decision.new_lr is not None else chief_lr
        if _compat.get_lr(self.model.optimizer) != lr:
            _compat.set_lr(self.model.optimizer, lr)
        logs["learning_rate"] = float(_compat.get_lr(self.model.optimizer))
        if decision.new_lr is not None:
            self._say(decision.message)


# --------------------------------------------------------------------------- checkpoint
class ChiefModelCheckpoint(_ForgeCallback):
    """Keras' ``ModelCheckpoint`` through the atomic store; only the chief writes.

    ``directory`` is any fsspec URL (a checkpoint root). Each save is one committed step
    named by the optimizer's iteration count, holding ``model.keras`` (or
    ``model.weights.h5`` with ``save_weights_only``) and a manifest with the epoch's
    metrics and every forge_dist callback's state. Other ranks never touch storage, but
    learn whether the save succeeded: a failed save is an error on every rank.

    With ``async_save=True`` the chief copies the model's and optimizer's variables to
    host memory at the save point and goes back to training; one background thread
    loads the copy into a twin of the model (built once), serializes, hashes and
    commits it. At most one save is in flight: a save due while one is being written
    waits for it (``when_busy="wait"``) or is skipped (``"skip"``, agreed on every
    rank). A background failure is raised on every rank at the next epoch end;
    ``on_train_end``, a preemption save and interpreter exit wait for the last commit.
    """

    state_key = "checkpoint"

    def __init__(
        self,
        directory: str,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        keep_last: int | None = None,
        keep_best: int | None = None,
        initial_value_threshold: float | None = None,
        storage_options: dict[str, Any] | None = None,
        communicator: Communicator | None = None,
        async_save: bool = False,
        when_busy: str = "wait",
    ) -> None:
        super().__init__(communicator, verbose)
        from forge_dist.storage import CheckpointStore

        if when_busy not in ("wait", "skip"):
            raise ConfigurationError(f"when_busy must be 'wait' or 'skip', got {when_busy!r}")
        if async_save and getattr(self.comm, "collective_saves", False):
            raise ConfigurationError(
                "async_save is not available under MultiWorkerMirroredStrategy: every worker "
                "takes part in each save there, so it cannot run behind the training loop"
            )
        self.async_save = bool(async_save)
        self.when_busy = when_busy
        self._background: _BackgroundWriter | None = None
        self._twin: Any = None

        # The mode is resolved from the model's metrics at train begin if the name does not
        # decide it.
        self._resolved_mode = self._setup_monitor(monitor, mode)
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ConfigurationError(
                f"save_freq must be 'epoch' or a positive int, got {save_freq!r}"
            )
        for name, v in (("keep_last", keep_last), ("keep_best", keep_best)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigurationError(f"{name} must be a positive int or None, got {v!r}")
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.save_freq = save_freq
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best: float | None = initial_value_threshold
        # Built on every rank so a missing backend fails everywhere at construction;
        # only the chief ever calls it.
        self.store = CheckpointStore(directory, storage_options)
        self.directory = self.store.display
        self._epoch = 0
        self._batches = 0
        self.last_saved_step: int | None = None
        self.saved_steps: list[int] = []

    def get_state(self) -> dict[str, Any]:
        return {"best": self.best, "mode": self._resolved_mode}

    def on_train_begin(self, logs: Any = None) -> None:
        if self._resolved_mode is None:
            self._resolved_mode = (
                self._resolve_mode(self.monitor, self.mode)
                if (self.save_best_only or self.keep_best)
                else "min"
            )
        if registry(self.model).keep_state:
            return
        restored = take_pending(self.model, self.state_key_unique)
        if restored:
            self.best = restored.get("best", self.best)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.save_freq == "epoch":
            return
        self._batches += 1
        if self._batches >= self.save_freq:
            self._batches = 0
            self._save(self._epoch, batch, logs or {}, epoch_done=False)

    def save_now(self, epoch: int, batch: int | None, epoch_done: bool) -> int:
        """Save whatever ``save_best_only`` says (every rank calls it, e.g. on preemption);
        return the step. A step this callback already saved is not written again."""
        step = int(_compat.to_numpy(self.model.optimizer.iterations))
        if self.last_saved_step != step:
            self._save(epoch, batch, {}, epoch_done=epoch_done, force=True)  # synchronous
        elif self.async_save:  # this step's save may still be in flight: let it commit
            self._agree(f"ChiefModelCheckpoint(step {step}) background", self._drain)
        return step

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.save_freq == "epoch":
            self._save(epoch, None, logs or {}, epoch_done=True)
        elif self.async_save:  # a background failure surfaces at every epoch end
            self._agree(f"ChiefModelCheckpoint(epoch {epoch}) background", self._raise_background)

    def on_train_end(self, logs: Any = None) -> None:
        if self.async_save:
            self._agree("ChiefModelCheckpoint(last background save)", self._drain)

    def _raise_background(self) -> None:
        """Chief: raise the error of a finished background save, if it failed."""
        if self._background is not None:
            self._background.raise_error()

    def _drain(self) -> None:
        """Chief: wait for the save in flight to commit; raise its error."""
        if self._background is not None:
            self._background.wait()
            self._background.raise_error()

    def _save(
        self,
        epoch: int,
        batch: int | None,
        logs: dict[str, Any],
        epoch_done: bool,
        force: bool = False,
    ) -> None:
        step = int(_compat.to_numpy(self.model.optimizer.iterations))
        name = f"ChiefModelCheckpoint(epoch {epoch}, step {step})"
        if batch is not None:  # position in the epoch, counting batches before a resume
            batch += registry(self.model).batch_offset

        def decide() -> policy.SaveDecision:
            self._raise_background()
            if force:
                return policy.SaveDecision(True, self.best, policy.Reason.SAVE)
            if self.when_busy == "skip" and self._background and self._background.busy:
                return policy.SaveDecision(
                    False, self.best, policy.Reason.SKIP, "the previous save is still in flight"
                )
            current = to_float(logs.get(self.monitor))
            return policy.save_step(
                self.monitor, self._resolved_mode or "min", self.best, current, self.save_best_only
            )

        decision = self._agree(name, decide)
        self.best = decision.best
        if not decision.save:
            if self.verbose > 1:
                self._say(f"epoch {epoch + 1}: {decision.message}")
            return
        state = {
            "epoch": epoch,
            "epoch_done": epoch_done,
            "batch": batch,
            "step": step,
            "learning_rate": _compat.get_lr(self.model.optimizer),
            "callbacks": collect_state(self.model),
        }
        if getattr(self.comm, "collective_saves", False):
            self._collective_save(name, step, logs, state)
        elif self.async_save and not force:
            self._agree(f"{name} snapshot", lambda: self._submit(step, logs, state))
        else:
            self._agree(f"{name} commit", lambda: (self._drain(), self._write(step, logs, state)))
        self.last_saved_step = step
        self.saved_steps.append(step)
        self._say(f"epoch {epoch + 1}: saved step {step} to {self.directory}")

    def _collective_save(
        self, name: str, step: int, logs: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """MultiWorkerMirroredStrategy: every worker saves (TensorFlow may read variables
        through collectives); the chief into the store, the others into a scratch folder
        outside the root that is always deleted. Any failure is raised on every worker."""
        failure: BaseException | None = None
        try:
            if self.comm.is_chief:
                self._write(step, logs, state)
            else:
                with self._scratch_save("forge-dist-worker-save-"):
                    pass  # saved only so the collectives line up; deleted right away
        except Exception as e:
            failure = e
        outcomes = self.comm.allgather(
            None if failure is None else f"{type(failure).__name__}: {failure}",
            name=f"{name} commit",
        )
        if failure is not None:
            raise failure
        bad = [(r, m) for r, m in enumerate(outcomes) if m is not None]
        if bad:
            raise ForgeDistError(f"{name} failed on worker {bad[0][0]}: {bad[0][1]}")

    def _submit(self, step: int, logs: dict[str, Any], state: dict[str, Any]) -> None:
        """Chief: wait for the save in flight, copy the variables into the twin (the
        snapshot: no allocation after the first save), hand the twin to the writer."""
        self._drain()
        if self._twin is None:
            self._twin = _Twin(self.model)
        self._twin.copy_from_live()
        lr = state.get("learning_rate")
        twin = self._twin.model

        def write() -> None:
            if lr is not None and twin.optimizer is not None:
                _compat.set_lr(twin.optimizer, float(lr))
            self._write(step, logs, state, model=twin)

        if self._background is None:
            self._background = _BackgroundWriter()
        self._background.start(write, f"step {step}")

    def _write(
        self, step: int, logs: dict[str, Any], state: dict[str, Any], model: Any = None
    ) -> None:
        """Chief only: save ``model`` (the live one by default) into the store (streamed,
        or through local scratch), commit, apply retention."""
        model = self.model if model is None else model
        metrics = {k: f for k, v in logs.items() if (f := to_float(v)) is not None}
        writer = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rank": self.comm.rank,
            "world_size": self.comm.size,
            "backend": self.comm.backend,
            "keras": _compat.FLAVOR,
        }
        stream_save = None if self.save_weights_only else _compat.keras_fileobj_saver()
        if stream_save is not None:
            # Stream the archive straight into the store: hashed as it is written, no
            # scratch copy, nothing read back.
            with (
                self.store.writer(step, metrics=metrics, state=state, writer=writer) as w,
                w.open("model.keras") as f,
            ):
                stream_save(model, f)
            self._retain()
            return
        with (
            self._scratch_save("forge-dist-save-", model) as path,
            self.store.writer(step, metrics=metrics, state=state, writer=writer) as w,
        ):
            w.add_file(os.path.basename(path), path)
        self._retain()

    @contextlib.contextmanager
    def _scratch_save(self, prefix: str, model: Any = None) -> Iterator[str]:
        """Save ``model`` (the live one by default) into a local scratch folder (never
        under the root); yield the file's path; delete the folder afterwards, even on
        error."""
        from forge_dist.errors import StorageError

        model = self.model if model is None else model
        scratch = tempfile.mkdtemp(prefix=prefix)
        try:
            fname = "model.weights.h5" if self.save_weights_only else "model.keras"
            path = os.path.join(scratch, fname)
            try:
                if self.save_weights_only:
                    model.save_weights(path)
                else:
                    model.save(path)
            except OSError as e:
                raise StorageError(f"cannot save the model to local scratch {scratch}: {e}") from e
            yield path
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _retain(self) -> None:
        if self.keep_last or self.keep_best:
            self.store.apply_retention(
                keep_last=self.keep_last,
                keep_best=self.keep_best,
                monitor=self.monitor if self.keep_best else None,
                mode=self._resolved_mode or "min",
            )


class _BackgroundWriter:
    """One non-daemon thread at a time (interpreter exit waits for it); keeps its error."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, fn: Callable[[], None], what: str) -> None:
        if self.busy:
            raise RuntimeError("a background save is already running")  # a bug, not input
        self._what = what

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # kept for the training loop to raise
                self._error = e

        self._thread = threading.Thread(target=run, name=f"forge-dist-save {what}")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def raise_error(self) -> None:
        if self._error is not None and not self.busy:
            e, self._error = self._error, None
            raise ForgeDistError(f"background save of {self._what} failed: {e}") from e


class _Twin:
    """A copy of ``model``'s architecture in host memory, with a plain optimizer of the
    same class and config, built once; ``copy_from_live()`` assigns every model and
    optimizer variable from the live model: what a background save writes."""

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        keras = _compat.keras
        if model.optimizer is not None:
            _compat.ensure_optimizer_built(model)  # a save before the first step
        with tf.device("/cpu:0"):
            try:
                twin = keras.models.clone_model(model)
            except Exception as e:
                raise ConfigurationError(
                    f"async_save needs a model keras.models.clone_model can copy: {e}"
                ) from e
            opt = model.optimizer
            if opt is not None:
                config = (
                    model.get_compile_config() if hasattr(model, "get_compile_config") else None
                )
                if config:
                    twin.compile_from_config(config)  # the same loss, metrics, optimizer
                else:
                    wrapped = getattr(type(opt), "_forge_dist_wrapped", False)
                    cls = type(opt).__mro__[1] if wrapped else type(opt)
                    twin.compile(optimizer=cls.from_config(opt.get_config()), loss=model.loss)
                _compat.ensure_optimizer_built(twin)
        self.model = twin
        self.pairs = list(zip(twin.weights, model.weights, strict=False))
        if len(twin.weights) != len(model.weights):
            raise ConfigurationError("async_save: the model's copy has other variables")
        if opt is not None:
            mine = _compat.optimizer_variables(opt)
            theirs = _compat.optimizer_variables(twin.optimizer)
            if len(mine) != len(theirs):
                raise ConfigurationError(
                    f"async_save could not rebuild the optimizer ({len(theirs)} variables, "
                    f"not {len(mine)})"
                )
            self.pairs += list(zip(theirs, mine, strict=True))
        for dst, src in self.pairs:
            if tuple(dst.shape) != tuple(src.shape):
                raise ConfigurationError(
                    f"async_save: {dst.path if hasattr(dst, 'path') else dst.name} has shape "
                    f"{tuple(dst.shape)} in the copy, {tuple(src.shape)} in the model"
                )

    def copy_from_live(self) -> None:
        for dst, src in self.pairs:
            dst.assign(src)


# --------------------------------------------------------------------------- preemption
class PreemptionCheckpoint(_ForgeCallback):
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
    75 by default). The last batch of an epoch is checked at the epoch end, after the
    other callbacks (put this one last), so a save never falls between a finished
    epoch and its validation. Resume with :func:`restore_latest` and
    :func:`fit_resumed`.
    """

    state_key = "preemption"

    def __init__(
        self,
        checkpoint: ChiefModelCheckpoint,
        signals: Any = None,
        check_every_n_batches: int | str = "auto",
        exit_code: int | None = None,
        communicator: Communicator | None = None,
        verbose: int = 1,
    ) -> None:
        from forge_dist.preemption import DEFAULT_SIGNALS, PREEMPTED_EXIT_CODE, SignalFlag

        if not isinstance(checkpoint, ChiefModelCheckpoint):
            raise ConfigurationError(
                "checkpoint must be the ChiefModelCheckpoint that saves on preemption, "
                f"got {type(checkpoint).__name__}"
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
        self.checkpoint = checkpoint
        self.flag = SignalFlag(DEFAULT_SIGNALS if signals is None else signals)
        self.check_every_n_batches = n
        self.every = 1 if n == "auto" else n  # batches between checks, now
        self.exit_code = code
        self._epoch = 0
        self._batches = 0
        self._steps: int | None = None
        self._timing = [0.0, 0, 0.0, 0]  # step seconds, steps, check seconds, checks
        self._t_last: float | None = None

    def on_train_begin(self, logs: Any = None) -> None:
        self.flag.install()
        self._steps = (self.params or {}).get("steps")

    def on_train_end(self, logs: Any = None) -> None:
        if not registry(self.model).partial_fit:
            self.flag.uninstall()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._batches = 0
        self._t_last = None

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        import time

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

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not self.model.stop_training:  # agreed on every rank; training ends anyway
            self._check(None, epoch_done=True)

    def _propose_every(self) -> int:
        """The spacing this rank would choose from what it measured (``"auto"``)."""
        step_s, steps, check_s, checks = self._timing
        if self.check_every_n_batches != "auto" or not steps or not checks:
            return self.every
        step, check = step_s / steps, check_s / checks
        cheap = math.ceil(check / (0.01 * max(step, 1e-9)))
        prompt = max(1, int(10.0 / max(step, 1e-9)))
        return max(1, min(cheap, prompt))

    def _check(self, batch: int | None, epoch_done: bool) -> None:
        from forge_dist.preemption import Preempted

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
        signalled = [f"rank {r}: {n}" for r, n in enumerate(got) if n]
        step = self.checkpoint.save_now(self._epoch, batch, epoch_done)
        position = None if batch is None else batch + registry(self.model).batch_offset
        stop = Preempted(self.exit_code, next(n for n in got if n), step, self._epoch, position)
        self._say(f"{stop} (signalled: {', '.join(signalled)})")
        self.flag.uninstall()  # fit ends here: on_train_end will not run
        raise stop


# --------------------------------------------------------------------------- broadcast
def broadcast_model_state(model: Any, comm: Communicator, root: int = 0, name: str = "") -> None:
    """Give every rank ``root``'s weights and optimizer variables."""
    if not model.built or not model.weights:
        raise ConfigurationError(
            "the model has no weights yet: build it (e.g. with keras.Input or model.build) "
            "before training, so the chief's initial weights can be broadcast"
        )
    if model.optimizer is not None:
        _compat.ensure_optimizer_built(model)
    payload = None
    if comm.rank == root:
        opt = (
            [_compat.to_numpy(v) for v in _compat.optimizer_variables(model.optimizer)]
            if model.optimizer is not None
            else []
        )
        payload = (model.get_weights(), opt)
    weights, opt_values = comm.broadcast(payload, root=root, name=name or "broadcast_model_state")
    if comm.rank != root:
        model.set_weights(weights)
        if model.optimizer is not None:
            assign_optimizer_variables(model, opt_values)


def assign_optimizer_variables(model: Any, values: list[Any]) -> None:
    variables = _compat.optimizer_variables(model.optimizer)
    if len(variables) != len(values):
        raise ConfigurationError(
            f"optimizer has {len(variables)} variables but {len(values)} were received: "
            "is every rank building the same model and optimizer?"
        )
    for var, value in zip(variables, values, strict=True):
        var.assign(np.asarray(value).reshape(tuple(var.shape)))


class BroadcastInitialState(_ForgeCallback):
    """At train begin every rank gets the chief's (``root``'s) model and optimizer
    variables: the replacement for Horovod's ``BroadcastGlobalVariablesCallback``,
    which is broken on Keras 3."""

    state_key = "broadcast"

    def __init__(self, root: int = 0, communicator: Communicator | None = None) -> None:
        super().__init__(communicator)
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.comm.size:
            raise ConfigurationError(f"root must be a rank in [0, {self.comm.size}), got {root!r}")
        self.root = root

    def on_train_begin(self, logs: Any = None) -> None:
        # A tf.distribute strategy creates every replica's variables from the chief's.
        if self.comm.size > 1 and self.comm.backend != "tf":
            broadcast_model_state(self.model, self.comm, self.root, "BroadcastInitialState")


# --------------------------------------------------------------------------- guard
class ConsistencyGuard(_ForgeCallback):
    """Compares a fingerprint of every rank's weights every ``every_n_epochs`` epochs.

    ``on_mismatch``: ``"raise"`` (an error on every rank), ``"warn"``, or ``"repair"``
    (every rank takes the chief's weights)."""

    state_key = "guard"

    def __init__(
        self,
        every_n_epochs: int = 1,
        on_mismatch: str = "raise",
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator)
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or (every_n_epochs < 1)
        ):
            raise ConfigurationError(
                f"every_n_epochs must be a positive int, got {every_n_epochs!r}"
            )
        if on_mismatch not in ("raise", "warn", "repair"):
            raise ConfigurationError(
                f"on_mismatch must be 'raise', 'warn' or 'repair', got {on_mismatch!r}"
            )
        self.every_n_epochs = every_n_epochs
        self.on_mismatch = on_mismatch
        self.fingerprints: list[str] = []
        self.mismatches = 0

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if (epoch + 1) % self.every_n_epochs:
            return
        mine = _compat.weights_fingerprint(self.model.get_weights())
        prints = self.comm.allgather(mine, name=f"ConsistencyGuard(epoch {epoch})")
        self.fingerprints.append(prints[0])
        differing = [r for r, p in enumerate(prints) if p != prints[0]]
        if not differing:
            return
        self.mismatches += 1
        msg = (
            f"epoch {epoch + 1}: weights differ from rank 0 on rank(s) "
            f"{', '.join(map(str, differing))} (a silent desync)"
        )
        if self.on_mismatch == "raise":
            raise CollectiveMismatchError(msg)
        if self.on_mismatch == "warn":
            log.warning(msg)
            return
        broadcast_model_state(self.model, self.comm, 0, f"ConsistencyGuard(repair epoch {epoch})")
        log.warning("%s; repaired from rank 0", msg)


# --------------------------------------------------------------------------- CSV
class ChiefCSVLogger(_ForgeCallback):
    """One CSV of the epoch logs, written by the chief through fsspec.

    The whole file is rewritten atomically each epoch (temp + rename on local disks,
    one PUT on object stores). With ``append=True`` a resumed run keeps the rows of the
    epochs before it and replaces any from the epoch it restarts at, so no epoch is
    listed twice."""

    state_key = "csv_logger"

    def __init__(
        self,
        url: str,
        separator: str = ",",
        append: bool = True,
        storage_options: dict[str, Any] | None = None,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator)
        import fsspec

        if not isinstance(url, str) or not url:
            raise ConfigurationError("url must be a non-empty string")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ConfigurationError(f"separator must be one character, got {separator!r}")
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as e:
            from forge_dist.errors import BackendNotInstalledError

            raise BackendNotInstalledError(f"cannot write the CSV to {url}: {e}") from e
        self.url = url
        self.separator = separator
        self.append = append
        self.rows: list[dict[str, str]] = []
        self.header: list[str] | None = None
        self._first_epoch: int | None = None

    def on_train_begin(self, logs: Any = None) -> None:
        self.rows, self.header, self._first_epoch = [], None, None
        if self.comm.is_chief and self.append:
            try:
                text = self.fs.cat_file(self.path).decode("utf-8")
            except FileNotFoundError:
                text = ""
            if text.strip():
                reader = csv.DictReader(io.StringIO(text), delimiter=self.separator)
                self.header = list(reader.fieldnames or [])
                self.rows = list(reader)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not self.comm.is_chief:
            return
        logs = logs or {}
        if self._first_epoch is None:
            self._first_epoch = epoch
            self.rows = [r for r in self.rows if int(float(r.get("epoch", -1))) < epoch]
        row = {"epoch": str(epoch)}
        for k in sorted(logs):
            f = to_float(logs[k])
            row[k] = repr(f) if f is not None else str(logs[k])
        if self.header is None:
            self.header = list(row)
        else:
            self.header += [k for k in row if k not in self.header]
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        out = io.StringIO()
        w = csv.DictWriter(
            out, fieldnames=self.header, delimiter=self.separator, lineterminator="\n", restval=""
        )
        w.writeheader()
        w.writerows(self.rows)
        data = out.getvalue().encode("utf-8")
        parent = self.path.rsplit("/", 1)[0] if "/" in self.path else ""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol in ("file", "local"):
            os.makedirs(parent or ".", exist_ok=True)
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        else:
            self.fs.pipe_file(self.path, data)


__all__ = [
    "BroadcastInitialState",
    "ChiefCSVLogger",
    "ChiefModelCheckpoint",
    "ConsistencyGuard",
    "PreemptionCheckpoint",
    "SyncEarlyStopping",
    "SyncMetrics",
    "SyncReduceLROnPlateau",
    "broadcast_model_state",
    "registry",
]
