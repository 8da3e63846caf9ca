"""``restore_latest``: every rank resumes from the newest checkpoint that verifies.

Only the chief reads storage (a corrupt newest step is reported and skipped); it loads
the weights and optimizer variables and broadcasts them with the callbacks' state, which
forge_dist's callbacks pick up in ``on_train_begin``. Pass the returned
``initial_epoch`` to ``model.fit``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from forge_dist.comm import Communicator, get_communicator
from forge_dist.errors import ConfigurationError, ForgeDistError
from forge_dist.keras import _compat
from forge_dist.keras._state import registry
from forge_dist.keras.callbacks import assign_optimizer_variables

log = logging.getLogger("forge_dist.keras")


@dataclass
class RestoreResult:
    restored: bool
    step: int | None = None
    epoch: int | None = None  # last epoch (0-based) the checkpoint saw
    initial_epoch: int = 0  # what to pass to model.fit
    initial_batch: int = 0  # batches of initial_epoch already trained (fit_resumed skips them)
    state: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # corrupt steps passed over


def _load_payload(path: str, weights_only: bool, model: Any, custom_objects: Any) -> tuple:
    if weights_only:
        if model.optimizer is not None:
            _compat.ensure_optimizer_built(model)  # so saved optimizer variables load too
        model.load_weights(path)
        opt_values = None
        if model.optimizer is not None:
            opt_values = [_compat.to_numpy(v) for v in _compat.optimizer_variables(model.optimizer)]
        return model.get_weights(), opt_values
    keras = _compat.keras
    loaded = keras.models.load_model(path, custom_objects=custom_objects, compile=True)
    opt = getattr(loaded, "optimizer", None)
    opt_values = None
    if opt is not None and _compat.optimizer_variables(opt):
        opt_values = [_compat.to_numpy(v) for v in _compat.optimizer_variables(opt)]
    return loaded.get_weights(), opt_values


def _fetch(store: Any, step: int, model: Any, custom_objects: Any) -> tuple:
    scratch = tempfile.mkdtemp(prefix="forge-dist-restore-")
    try:
        dest = store.download(step, os.path.join(scratch, "ckpt"))
        if os.path.exists(os.path.join(dest, "model.keras")):
            return _load_payload(os.path.join(dest, "model.keras"), False, model, custom_objects)
        if os.path.exists(os.path.join(dest, "model.weights.h5")):
            return _load_payload(
                os.path.join(dest, "model.weights.h5"), True, model, custom_objects
            )
        raise ConfigurationError(f"step {step} holds neither model.keras nor model.weights.h5")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _chief_restore(
    directory: str, storage_options: Any, verify: str, model: Any, custom_objects: Any
) -> Any:
    from forge_dist.storage import CheckpointStore

    store = CheckpointStore(directory, storage_options)
    if not store.root_exists():
        return None  # a first run: nothing saved yet
    infos = store.list()
    skipped: list[str] = []
    chosen = None
    for info in reversed(infos):
        if store._usable(info, verify):
            chosen = info
            break
        skipped.append(info.name)
    if chosen is None:
        return None
    state = dict(chosen.state)
    weights, opt_values = _fetch(store, chosen.step, model, custom_objects)
    # EarlyStopping(restore_best_weights) needs the weights of its best epoch, which a
    # checkpoint kept for that epoch holds (production_callbacks keeps the best one).
    best: dict[str, Any] = {}
    for key, cb_state in (state.get("callbacks") or {}).items():
        if not key.startswith("early_stopping") or not cb_state.get("has_best_weights"):
            continue
        best_epoch = cb_state.get("best_epoch")
        if best_epoch == state.get("epoch"):
            best[key] = weights
            continue
        match = [
            c
            for c in infos
            if c.readable and c.state.get("epoch") == best_epoch and c.state.get("epoch_done")
        ]
        if match and store._usable(match[-1], verify):
            best[key] = _fetch(store, match[-1].step, model, custom_objects)[0]
        else:
            log.warning(
                "no intact checkpoint of best epoch %s for %s: restore_best_weights will use "
                "the best epoch seen after resuming",
                best_epoch,
                key,
            )
    return chosen.step, state, weights, opt_values, best, skipped


def restore_latest(
    model: Any,
    directory: str,
    storage_options: dict[str, Any] | None = None,
    communicator: Communicator | None = None,
    verify: str = "full",
    custom_objects: dict[str, Any] | None = None,
) -> RestoreResult:
    """Restore ``model`` (built and compiled) on every rank from the newest intact
    checkpoint under ``directory``; return what was restored and the ``initial_epoch``.
    With no checkpoint yet, nothing changes and ``initial_epoch`` is 0."""
    comm = communicator if communicator is not None else get_communicator("auto")
    if getattr(comm, "multi_worker", False):
        import tensorflow as tf

        if tf.distribute.in_cross_replica_context() and tf.distribute.has_strategy():
            raise ConfigurationError(
                "call restore_latest outside strategy.scope(): the chief loads the checkpoint "
                "alone, and a load inside a MultiWorkerMirroredStrategy scope would need "
                "every worker"
            )
    if verify not in ("fast", "full"):
        raise ConfigurationError(f"verify must be 'fast' or 'full', got {verify!r}")
    payload: Any = None
    failure: BaseException | None = None
    if comm.is_chief:
        try:
            payload = (
                "ok",
                _chief_restore(directory, storage_options, verify, model, custom_objects),
            )
        except Exception as e:
            failure = e
            payload = ("error", f"{type(e).__name__}: {e}")
    payload = comm.broadcast(payload, name="restore_latest")
    if payload[0] == "error":
        if failure is not None:
            raise failure
        raise ForgeDistError(f"restore_latest failed on rank 0: {payload[1]}")
    if payload[1] is None:
        return RestoreResult(False)
    step, state, weights, opt_values, best, skipped = payload[1]
    model.set_weights(weights)
    if model.optimizer is not None and opt_values is not None:
        _compat.ensure_optimizer_built(model)
        assign_optimizer_variables(model, opt_values)
    if model.optimizer is not None and state.get("learning_rate") is not None:
        _compat.set_lr(model.optimizer, float(state["learning_rate"]))
    reg = registry(model)
    reg.pending = dict(state.get("callbacks") or {})
    for key, w in best.items():
        reg.pending[f"{key}:best_weights"] = w
    epoch = state.get("epoch")
    reg.restored_epoch = epoch
    epoch_done = state.get("epoch_done", True)
    initial = 0 if epoch is None else int(epoch) + (1 if epoch_done else 0)
    batch = state.get("batch")
    initial_batch = 0 if epoch_done or batch is None else int(batch) + 1
    if comm.is_chief:
        log.info(
            "restored step %s (epoch %s, %s) from %s",
            step,
            epoch,
            "end" if epoch_done else f"after batch {initial_batch}",
            directory,
        )
    return RestoreResult(True, step, epoch, initial, initial_batch, state, skipped)


def _skip_rows(data: Any, rows: int) -> Any:
    """``data`` without its first ``rows`` samples: arrays, or lists/tuples/dicts of them."""
    if data is None:
        return None
    if isinstance(data, dict):
        return {k: _skip_rows(v, rows) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_skip_rows(v, rows) for v in data)
    if not hasattr(data, "shape") or not hasattr(data, "__getitem__"):
        raise ConfigurationError(
            "fit_resumed resumes mid-epoch only for array inputs (NumPy arrays, or lists or "
            f"dicts of them), got {type(data).__name__}; save at epoch ends instead"
        )
    return data[rows:]


def fit_resumed(
    model: Any,
    restored: RestoreResult | None,
    x: Any = None,
    y: Any = None,
    *,
    batch_size: int | None = None,
    epochs: int = 1,
    callbacks: list[Any] | None = None,
    shuffle: bool = False,
    **fit_kwargs: Any,
) -> Any:
    """``model.fit`` that continues exactly where ``restored`` stopped.

    After a checkpoint taken at an epoch end this is ``model.fit(...,
    initial_epoch=restored.initial_epoch)``. After one taken mid-epoch (a preemption, or
    ``save_freq=N``) it first trains the rest of that epoch on the samples its first
    ``restored.initial_batch`` batches did not cover, then the remaining epochs, with the
    same callback objects and their state carried between the two fits, so the result is
    the one an uninterrupted run would have reached. That needs the same batches in the
    same order: array inputs with ``shuffle=False``. Returns the last fit's History.
    """
    from forge_dist.keras._state import registry

    epoch = restored.initial_epoch if restored is not None else 0
    skip = restored.initial_batch if restored is not None else 0
    args = dict(fit_kwargs, batch_size=batch_size, callbacks=callbacks, shuffle=shuffle)
    if skip == 0 or epoch >= epochs:
        return model.fit(x, y, epochs=epochs, initial_epoch=epoch, **args)
    if shuffle:
        raise ConfigurationError(
            "resuming mid-epoch needs the interrupted epoch's batches in their order: "
            "pass shuffle=False"
        )
    rows = skip * (batch_size or 32)  # Keras' default batch size
    reg = registry(model)
    reg.batch_offset, reg.partial_fit = skip, epoch + 1 < epochs
    try:
        history = model.fit(
            _skip_rows(x, rows), _skip_rows(y, rows), epochs=epoch + 1, initial_epoch=epoch, **args
        )
    finally:
        reg.batch_offset, reg.partial_fit = 0, False
    if model.stop_training or epoch + 1 >= epochs:
        return history
    reg.keep_state = True
    try:
        return model.fit(x, y, epochs=epochs, initial_epoch=epoch + 1, **args)
    finally:
        reg.keep_state = False
