"""``ChiefModelCheckpoint``: Keras' ``ModelCheckpoint`` through the atomic store."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from forge_dist import policy
from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError, ForgeDistError
from forge_dist.keras import _compat, keras_files, tiers
from forge_dist.keras import run as run_mod
from forge_dist.keras._compat import to_float
from forge_dist.keras._state import WEIGHTS_OF_EPOCH, collect_state, registry, root_key
from forge_dist.keras.async_checkpoint import AsyncCheckpointer
from forge_dist.keras.callbacks.base import (
    ForgeCallback,
    check_positive_int,
    is_save_freq,
    keras_alias,
    monitor_value,
)
from forge_dist.keras.metric_state import metric_names, metric_values, saved_state
from forge_dist.keras.preflight import check_room
from forge_dist.keras.saving import Snapshot, StagedSaves, save_to_store, scratch_save
from forge_dist.keras.snapshot import HostTwin
from forge_dist.storage.files import FileTarget

WHEN_BUSY = ("wait", "skip")
BUSY = "the previous save is still in flight"


def _check_run_arguments(run_name: Any, overwrite: Any) -> None:
    if overwrite not in run_mod.OVERWRITE:
        raise ConfigurationError(
            f"overwrite must be None, 'archive' or 'delete', got {overwrite!r}"
        )
    if run_name is not None and (not isinstance(run_name, str) or not run_name):
        raise ConfigurationError(f"run_name must be a non-empty string, got {run_name!r}")


def check_target(url: Any) -> str:
    """A checkpoint folder, or a Keras file path or template."""
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"filepath must be a non-empty string, got {url!r}")
    return url


class ChiefModelCheckpoint(ForgeCallback):
    """Keras' ``ModelCheckpoint``, written atomically by the chief only.

    ``filepath`` (or ``directory``) is any fsspec URL, either

    * a Keras file path or template (``"models/best_model.keras"``,
      ``"ckpt/model_{epoch:02d}_{val_accuracy:.4f}.keras"``, ``"m.weights.h5"`` with
      ``save_weights_only``): the files Keras' ``ModelCheckpoint`` writes appear at those
      paths, each replaced atomically and recorded in a sidecar
      (``<file>.manifest.json``) that ``forge-dist verify <file>`` checks it against; or
    * a folder (a checkpoint root, the resumable store): each save is one committed step
      named by the optimizer's iteration count, holding ``model.keras`` (or
      ``model.weights.h5``) and a manifest with the epoch's metrics and every forge_dist
      callback's state, which :func:`restore_latest` and :class:`BackupAndRestore`
      resume from; ``keep_last``/``keep_best`` choose what is kept.

    Other ranks never touch storage, but learn whether the save succeeded: a failed save
    is an error on every rank. An epoch's save comes after every forge_dist callback of
    the fit has ended the epoch, wherever this one stands in the list.

    With ``async_save=True`` the chief copies the model's and optimizer's variables to
    host memory at the save point (:class:`~forge_dist.keras.snapshot.HostTwin`) and
    goes back to training; an :class:`~forge_dist.keras.async_checkpoint.AsyncCheckpointer`
    serializes, hashes and commits the copy. At most one save is in flight: a save due
    while one is being written waits for it (``when_busy="wait"``) or is skipped
    (``"skip"``, agreed on every rank). A background failure is raised on every rank at
    the next epoch end; ``on_train_end``, a preemption save and interpreter exit wait
    for the last commit.

    Two tiers: with ``local_directory`` (a fast node-local folder: a tmpfs, a local SSD)
    each step is committed there and copied into ``directory`` (the durable root: NFS,
    a bucket) in the background, oldest first, hashed against the local manifest as it
    is read and committed there manifest last (:mod:`forge_dist.storage.tiers`). A step
    is durable once its manifest is in ``directory``. ``keep_last``/``keep_best`` apply
    to ``directory``, ``local_keep_last`` (default 2) to the local folder, which never
    deletes a step that is not durable yet. A failed copy is an error on every rank at
    the next epoch end; the end of training and a preemption's save wait until every
    step is durable. Pass the same two folders to :func:`restore_latest`.
    """

    state_key = "checkpoint"
    #: What a run conflict tells the user to pass (production_callbacks names itself).
    overwrite_remedy = run_mod.OVERWRITE_REMEDY
    complete_order = 1  # after every logger wrote the epoch (see forge_dist.keras.fit)

    def __init__(
        self,
        directory: str | None = None,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        keep_last: int | None = None,
        keep_best: int | None = None,
        storage_options: dict[str, Any] | None = None,
        communicator: Communicator | None = None,
        async_save: bool = False,
        when_busy: str = "wait",
        filepath: str | None = None,
        run_name: str | None = None,
        overwrite: str | None = None,
        local_directory: str | None = None,
        local_keep_last: int | None = 2,
    ) -> None:
        super().__init__(communicator, verbose)
        from forge_dist.storage import CheckpointStore

        target = check_target(keras_alias("directory", directory, "filepath", filepath))
        self._check_arguments(save_freq, keep_last, keep_best, async_save, when_busy)
        _check_run_arguments(run_name, overwrite)
        #: A Keras file path or template (files mode), else None (a checkpoint folder).
        self.filepath: str | None = None
        if keras_files.names_a_file(target):
            self.filepath = keras_files.check_filepath(target, bool(save_weights_only))
            for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
                if value is not None:
                    raise ConfigurationError(
                        f"{name} applies to a checkpoint folder (steps kept by retention), "
                        f"not to a Keras file path ({target!r}): pass a folder, or drop {name}"
                    )
            for name, value in (("overwrite", overwrite), ("local_directory", local_directory)):
                if value is not None:
                    raise ConfigurationError(
                        f"{name} applies to a checkpoint folder; a Keras file path is "
                        "replaced at each save, as Keras does"
                    )
        self.run_name, self.overwrite = run_name, overwrite
        self.run: dict[str, Any] | None = None  # decided by the chief at train begin
        self._lease: Any = None  # the writer generation the chief holds
        self.async_save = bool(async_save)
        self.when_busy = when_busy
        self.async_checkpointer = AsyncCheckpointer() if async_save else None
        self._twin: HostTwin | None = None  # the async snapshot where no layout is known
        self._staged = StagedSaves()
        # The mode is resolved from the model's metrics at train begin if the name does not
        # decide it.
        self._resolved_mode = self._setup_monitor(monitor, mode)
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.save_freq = save_freq
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best: float | None = initial_value_threshold
        self.storage_options = storage_options
        # Built on every rank so a missing backend fails everywhere at construction;
        # only the chief ever calls it.
        self.store: Any = None
        #: Two tiers (``local_directory``): steps are committed there and copied into
        #: ``directory`` in the background (see :mod:`forge_dist.storage.tiers`).
        self.local_store: Any = None
        self.local_keep_last = local_keep_last
        self.replicator: Any = None  # the chief's, from train begin
        self._local_lease: Any = None
        if self.filepath is None:
            self.store = CheckpointStore(target, storage_options)
            self.directory = self.store.display
            if local_directory is not None:
                self.local_store = tiers.local_tier(local_directory, self.store, local_keep_last)
        else:
            self.directory = FileTarget(self.filepath, storage_options).display
        self._epoch = 0
        self._batches = 0
        self.last_saved_step: int | None = None
        self.saved_steps: list[int] = []
        self.save_seconds: list[float] = []  # chief: how long each commit took (this run)

    def _check_arguments(
        self,
        save_freq: Any,
        keep_last: Any,
        keep_best: Any,
        async_save: bool,
        when_busy: str,
    ) -> None:
        """Every rank, at construction: the arguments Keras does not have, and save_freq."""
        if when_busy not in WHEN_BUSY:
            raise ConfigurationError(f"when_busy must be 'wait' or 'skip', got {when_busy!r}")
        if async_save and self.comm.collective_saves:
            raise ConfigurationError(
                "async_save is not available under MultiWorkerMirroredStrategy: every worker "
                "takes part in each save there, so it cannot run behind the training loop"
            )
        if not is_save_freq(save_freq):
            raise ConfigurationError(
                f"Unrecognized save_freq: {save_freq!r}: expected 'epoch' or a positive int "
                "(save every N batches)"
            )
        check_positive_int("keep_last", keep_last, allow_none=True)
        check_positive_int("keep_best", keep_best, allow_none=True)

    # -- the state protocol
    def state_id(self) -> str:
        target = (self.filepath or self.directory).rstrip("/").rsplit("/", 1)[-1]
        return f"{self.state_key}[{target}]"

    def get_state(self) -> dict[str, Any]:
        return {"best": self.best, "mode": self._resolved_mode}

    def set_state(self, state: dict[str, Any], weights: list[Any] | None = None) -> None:
        self.best = state.get("best", self.best)

    @property
    def monitor_op(self) -> Any:
        """Keras' comparison for the resolved mode, or None while it is unresolved."""
        return None if self._resolved_mode is None else _compat.monitor_op(self._resolved_mode)

    def _finish_monitor_mode(self, final: bool) -> None:
        """``mode="auto"``: from the name, else from the model's compiled metric, which
        Keras 3 builds at the first step (so unresolved at train begin, it is resolved
        at the first save, as Keras does; still unresolved there, an error everywhere)."""
        ranked = self.save_best_only or self.keep_best
        if self._resolved_mode is None:
            if not ranked:
                self._resolved_mode = "min"
                return
            try:
                self._resolved_mode = self._resolve_mode(self.monitor, self.mode)
            except ConfigurationError:
                if final:
                    raise
                return
        if ranked and not final:
            self._check_mode_direction()

    # -- Keras hooks
    def train_begin(self, logs: Any = None) -> None:
        self._finish_monitor_mode(final=False)
        self.begin_state()
        # Before the first step: the root is writable, has room for what is kept, and
        # holds no other run's steps.
        self._agree("ChiefModelCheckpoint(pre-flight)", self._preflight)

    def _preflight(self) -> None:
        """Chief: room for the checkpoints, and this run's identity."""
        if self.filepath is not None:  # Keras' files: the folder can be written
            folder = self.filepath.rsplit("/", 1)[0] if "/" in self.filepath else "."
            if "{" not in folder:
                FileTarget(f"{folder}/x", self.storage_options).probe()
            return
        self.store.probe_writable()  # (also makes a local root, so listing it works)
        infos = self.store.list()
        check_room(self.store, self.model, self.retention(), self.async_save, infos)
        runs = registry(self.model).runs
        key = root_key(self.store.url)
        if self.run is None:
            self.run = runs.get(key)  # restored, or started by an earlier fit of this model
        if self.run is None:
            if infos and self.overwrite is None:
                raise run_mod.foreign_steps_error(self.directory, infos, self.overwrite_remedy)
            if infos:
                self._clear_old_steps(infos)
            self.run = run_mod.new_run(self.run_name)
        self.run = run_mod.current(self.run, self.model, self.run_name)
        runs[key] = self.run
        if self._lease is None:  # fencing: an older attempt still running can't commit
            self._lease = self.store.take_lease(self.run["id"])
        if self.local_store is not None and self.replicator is None:
            tiers.start(self)

    def _clear_old_steps(self, infos: list[Any], store: Any = None) -> None:
        """``overwrite``: another run's steps archived (local roots) or deleted first."""
        store = self.store if store is None else store
        if self.overwrite == "archive":
            folder = store.archive_steps([c.step for c in infos])
            self._say(f"moved {len(infos)} step(s) of another run to {folder}")
            return
        for c in infos:
            store.delete(c.step)
        self._say(f"deleted {len(infos)} step(s) of another run from {store.display}")

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.save_freq == "epoch":
            return
        self._batches += 1
        if self._batches >= self.save_freq:
            self._batches = 0
            self._save(self._epoch, batch, logs or {}, epoch_done=False)

    def epoch_complete(self, epoch: int, logs: Any = None) -> None:
        if self.save_freq == "epoch":
            self._save(epoch, None, logs or {}, epoch_done=True)
        elif self.async_save:  # a background failure surfaces at every epoch end
            self._agree(f"ChiefModelCheckpoint(epoch {epoch}) background", self._check_background)

    def on_train_end(self, logs: Any = None) -> None:
        if self.async_save or self.local_store is not None:
            self._agree("ChiefModelCheckpoint(last background save)", self._drain_all)

    def save_now(self, epoch: int, batch: int | None, epoch_done: bool) -> int:
        """Save whatever ``save_best_only`` says (every rank calls it, e.g. on preemption);
        return the step. A step this callback already saved is not written again."""
        step = _compat.iterations(self.model)
        if self.last_saved_step != step:
            self._save(epoch, batch, {}, epoch_done=epoch_done, force=True)  # synchronous
        if self.async_save or self.local_store is not None:
            # this step's save may still be in flight, and (two tiers) not durable yet
            self._agree(f"ChiefModelCheckpoint(step {step}) background", self._drain_all)
        return step

    # -- background saves (chief only)
    def _check_background(self) -> None:
        """Raise the error of a finished background save, if it failed."""
        if self.async_checkpointer is not None:
            self.async_checkpointer.check_for_errors()
        if self.replicator is not None:
            self.replicator.check_for_errors()

    def _drain_all(self) -> None:
        """Wait for the save in flight, then for every step to be durable."""
        self._drain()
        if self.replicator is not None:
            self.replicator.wait()

    def _drain(self) -> None:
        """Wait for the save in flight to commit; raise its error."""
        if self.async_checkpointer is not None:
            self.async_checkpointer.wait_until_finished()
            self.async_checkpointer.check_for_errors()

    # -- saving
    def _decide(
        self, logs: dict[str, Any], force: bool, epoch_end: bool = True
    ) -> policy.SaveDecision:
        """Chief: whether this save point saves."""
        self._check_background()
        if force:
            return policy.SaveDecision(True, self.best, policy.Reason.SAVE)
        busy = self.async_checkpointer is not None and self.async_checkpointer.busy
        if self.when_busy == "skip" and busy:
            return policy.SaveDecision(False, self.best, policy.Reason.SKIP, BUSY)
        current = to_float(logs.get(self.monitor))
        if current is None and self.save_best_only and epoch_end:
            # (A typo was refused before: validation did not run this epoch.) Keras saves
            # then; an unvalidated model must not replace the best one.
            return policy.SaveDecision(
                False, self.best, policy.Reason.SKIP, f"no {self.monitor} this epoch"
            )
        return policy.save_step(
            self.monitor, self._resolved_mode or "min", self.best, current, self.save_best_only
        )

    def _tell(self, epoch: int, decision: policy.SaveDecision, prev: Any, logs: Any, where: str):
        """Keras' lines for a save point (``verbose > 0``, on the chief)."""
        current = to_float(logs.get(self.monitor))
        best = "None" if prev is None else f"{prev:.5f}"
        ranked = self.save_best_only and current is not None
        if decision.save and ranked:
            self._say_as_keras(
                f"\nEpoch {epoch + 1}: {self.monitor} improved from {best} to {current:.5f}, "
                f"saving model to {where}"
            )
        elif decision.save:
            self._say_as_keras(f"\nEpoch {epoch + 1}: saving model to {where}")
        elif ranked and decision.message != BUSY:
            self._say_as_keras(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best}")
        else:  # in flight (when_busy="skip"), or no validation this epoch
            self._say_as_keras(f"\nEpoch {epoch + 1}: {decision.message}: not saved")

    def _save(
        self,
        epoch: int,
        batch: int | None,
        logs: dict[str, Any],
        epoch_done: bool,
        force: bool = False,
    ) -> None:
        step = _compat.iterations(self.model)
        name = f"ChiefModelCheckpoint(epoch {epoch}, step {step})"
        reg = registry(self.model)
        samples = None
        if batch is not None and not epoch_done and reg.shard is not None:
            # Every rank holds the whole dataset: the position is a global sample offset,
            # which a job of any size can continue from.
            n, batch_size, size = reg.shard
            samples = policy.samples_done(n, reg.sample_offset, batch_size, size, batch + 1)
        if batch is not None:  # position in the epoch, counting batches before a resume
            batch += reg.batch_offset
        self._finish_monitor_mode(final=True)
        path = None
        if self.filepath is not None:  # every rank: a bad template fails everywhere alike
            path = keras_files.format_filepath(self.filepath, epoch, batch, logs)
        where = path or f"{self.directory} (step {step})"
        if self.save_best_only and not force and epoch_done:  # a typo: one error everywhere
            monitor_value(logs, self.monitor, "ChiefModelCheckpoint")
        prev = self.best
        decision = self._agree(name, lambda: self._decide(logs, force, epoch_done))
        self.best = decision.best
        if not force:
            self._tell(epoch, decision, prev, logs, where)
        if not decision.save:
            return
        if path is not None:
            self._save_file(name, step, logs, {"epoch": epoch, "step": step, "file": path})
            self._say_as_keras(f"\nEpoch {epoch + 1}: finished saving model to {where}")
            return
        state = {
            "epoch": epoch,
            "epoch_done": epoch_done,
            "batch": batch,
            "world_size": self.comm.size,
            "step": step,
            "learning_rate": _compat.get_lr(self.model.optimizer),
            "callbacks": collect_state(self.model),
        }
        if samples is not None:
            state["samples"] = samples
        if reg.data_seed is not None:  # the epochs' order (fit_resumed(shuffle=True))
            state["data_seed"] = reg.data_seed
        if not epoch_done and not self.comm.collective_saves:
            # Mid-epoch: every rank's running metric totals, so the resumed epoch's
            # training metrics come out as an uninterrupted run's.
            ranks = self.comm.allgather(metric_values(self.model), name=f"{name} metrics")
            state["metric_state"] = saved_state(ranks, metric_names(self.model))
        if self.comm.collective_saves:
            self._collective_save(name, step, logs, state)
        elif self.async_save and not force:
            self._agree(f"{name} snapshot", lambda: self._submit(step, logs, state))
        else:
            self._agree(f"{name} commit", lambda: self._commit_now(step, logs, state))
        self.last_saved_step = step
        self.saved_steps.append(step)
        if not force:  # (a preemption's save is said by the preemption, as such)
            self._say_as_keras(f"\nEpoch {epoch + 1}: finished saving model to {where}")

    def _save_file(self, name: str, step: int, logs: dict[str, Any], state: dict[str, Any]):
        """Keras' file at ``state["file"]``: written by the chief (every worker takes part
        under MultiWorkerMirroredStrategy), in the background with ``async_save``."""
        if self.comm.collective_saves:
            self._collective_save(name, step, logs, state)
        elif self.async_save:
            self._agree(f"{name} snapshot", lambda: self._submit(step, logs, state))
        else:
            self._agree(f"{name} write", lambda: self._commit_now(step, logs, state))
        self.last_saved_step = step
        self.saved_steps.append(step)

    def retention(self) -> policy.Retention:
        """What is kept, as one value (the mode once ``mode="auto"`` is resolved)."""
        return policy.Retention(
            self.keep_last,
            self.keep_best,
            self.monitor if self.keep_best else None,
            self._resolved_mode or "min",
        )

    def local_retention(self) -> policy.Retention:
        """What the fast tier keeps (besides the steps not durable yet)."""
        return policy.Retention(self.local_keep_last, None, None, "min")

    def _may_replace(self, step: int) -> bool:
        restored = registry(self.model).restored_step
        return restored is None or step > restored

    def _collective_save(
        self, name: str, step: int, logs: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Every worker saves (TensorFlow may read variables through collectives); the
        chief into the store, the others into a scratch folder outside the root that is
        always deleted. Any failure is raised on every worker."""
        failure: BaseException | None = None
        try:
            if self.comm.is_chief:
                self._write(step, logs, state)
            else:
                with scratch_save(self.model, self.save_weights_only, "forge-dist-worker-save-"):
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

    def _commit_now(self, step: int, logs: dict[str, Any], state: dict[str, Any]) -> None:
        """Chief: a synchronous save, streamed from the variables where the layout is
        known (the loop is held until it has committed)."""
        self._drain()
        self._write(step, logs, state, snapshot=self._staged.live(self.model))

    def _submit(self, step: int, logs: dict[str, Any], state: dict[str, Any]) -> None:
        """Chief: wait for the save in flight, copy the variables into the host buffers
        (or, where no layout is known, the twin): the snapshot; hand it to the
        background writer."""
        assert self.async_checkpointer is not None
        self._drain()
        snapshot = self._staged.copy(self.model)
        if snapshot is not None:
            self.async_checkpointer.save(
                lambda: self._write(step, logs, state, snapshot=snapshot), f"step {step}"
            )
            return
        if self._twin is None:
            self._twin = HostTwin(self.model)
        self._twin.copy_from_live()
        lr = state.get("learning_rate")
        twin = self._twin.model

        def write() -> None:
            if lr is not None and twin.optimizer is not None:
                _compat.set_lr(twin.optimizer, float(lr))
            self._write(step, logs, state, model=twin)

        self.async_checkpointer.save(write, f"step {step}")

    def _write(
        self,
        step: int,
        logs: dict[str, Any],
        state: dict[str, Any],
        model: Any = None,
        snapshot: Snapshot | None = None,
    ) -> None:
        """Chief only: commit ``snapshot`` or ``model`` (the live one by default), apply
        retention; or, with a Keras file path, replace that file."""
        metrics = {k: f for k, v in logs.items() if (f := to_float(v)) is not None}
        writer = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rank": self.comm.rank,
            "world_size": self.comm.size,
            "backend": self.comm.backend,
            "keras": _compat.FLAVOR,
        }
        if self.filepath is not None:
            meta = {
                "epoch": state["epoch"],
                "step": step,
                "metrics": metrics,
                "writer": writer,
                "run": self.run,
            }
            target = FileTarget(state["file"], self.storage_options)
            keras_files.write_model_file(
                target,
                self.model if model is None else model,
                self.save_weights_only,
                snapshot,
                {k: v for k, v in meta.items() if v is not None},
            )
            return
        t0 = time.perf_counter()
        tiered = self.replicator is not None
        save_to_store(
            self.local_store if tiered else self.store,
            step,
            self.model if model is None else model,
            weights_only=self.save_weights_only,
            metrics=metrics,
            state=state,
            writer=writer,
            run=self.run,
            lease=self._local_lease if tiered else self._lease,
            snapshot=snapshot,
            # This run's steps past the one it resumed from are from an attempt no
            # checkpoint covers (a newer step was corrupt, or taken mid-epoch and passed
            # over): reaching that step again rewrites it.
            replace=self._may_replace(step),
        )
        self.save_seconds.append(time.perf_counter() - t0)
        # the epochs whose weights a callback's state asks back (the best one)
        epochs = [
            s[WEIGHTS_OF_EPOCH]
            for s in (state.get("callbacks") or {}).values()
            if isinstance(s, dict) and s.get(WEIGHTS_OF_EPOCH) is not None
        ]
        if not tiered:
            self._retain(self.store, self.retention(), [step], epochs, self._lease)
            return
        self.replicator.submit(
            step,
            replace=self._may_replace(step),
            then=lambda: self._retain(self.store, self.retention(), [step], epochs, self._lease),
        )
        # The fast root keeps every step not durable yet.
        protect = [step, *self.replicator.pending]
        self._retain(self.local_store, self.local_retention(), protect, epochs, self._local_lease)

    def _retain(self, store: Any, retention: Any, protect: list[int], epochs: list, lease: Any):
        """Chief: ``retention`` applied to ``store`` after a commit (``protect``: the step
        just committed, and on the fast tier those not durable yet)."""
        if retention.active:
            store.apply_retention(
                retention,
                protect=protect,
                run_id=(self.run or {}).get("id"),  # only this run's steps
                lease=lease,
                protect_epochs=epochs,
            )
