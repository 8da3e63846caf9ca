"""``restore_latest``: every rank resumes from the newest checkpoint that verifies.

Only the chief reads storage (a corrupt newest step is reported and skipped); it loads
the weights and optimizer variables and broadcasts them with the callbacks' state, which
forge_dist's callbacks pick up in ``on_train_begin``. Pass the returned
``initial_epoch`` to ``model.fit``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forge_dist import policy
from forge_dist._urls import redact_url
from forge_dist.comm import Communicator, agree, get_communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras._state import WEIGHTS_OF_EPOCH, Restored, registry, root_key, set_pending
from forge_dist.keras.callbacks.base import ForgeCallback
from forge_dist.keras.callbacks.broadcast import assign_optimizer_variables, optimizer_values
from forge_dist.keras.metric_state import RestoreMetricState, values_for
from forge_dist.keras.run import check_same_model
from forge_dist.keras.saving import MODEL_FILE, WEIGHTS_FILE
from forge_dist.keras.stack import check_distributed_callbacks, check_same_fit

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
    run: dict[str, Any] = field(default_factory=dict)  # the run it continues (id, name, ...)
    #: Mid-epoch, from a run that used ``fit_resumed(shard=True)``: global samples of
    #: ``initial_epoch`` already trained (a position valid at any number of ranks).
    initial_sample: int | None = None
    world_size: int | None = None  # ranks of the job that saved it (None: not recorded)


def _load_payload(path: str, weights_only: bool, model: Any, custom_objects: Any) -> tuple:
    """``(weights, optimizer values)`` from a saved file; a weights file is loaded into
    ``model`` itself, a ``.keras`` archive into a new model."""
    if weights_only:
        if model.optimizer is not None:
            _compat.ensure_optimizer_built(model)  # so saved optimizer variables load too
        model.load_weights(path)
        return model.get_weights(), optimizer_values(model) if model.optimizer else None
    loaded = _compat.keras.models.load_model(path, custom_objects=custom_objects, compile=True)
    opt_values = optimizer_values(loaded) if getattr(loaded, "optimizer", None) else []
    return loaded.get_weights(), opt_values or None


def _fetch(store: Any, step: int, model: Any, custom_objects: Any) -> tuple:
    """Download ``step`` (verified while copied) to local scratch and load it."""
    scratch = tempfile.mkdtemp(prefix="forge-dist-restore-")
    try:
        dest = store.download(step, os.path.join(scratch, "ckpt"))
        for name, weights_only in ((MODEL_FILE, False), (WEIGHTS_FILE, True)):
            if os.path.exists(os.path.join(dest, name)):
                return _load_payload(os.path.join(dest, name), weights_only, model, custom_objects)
        raise ConfigurationError(f"step {step} holds neither {MODEL_FILE} nor {WEIGHTS_FILE}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _weights_of_epoch(
    store: Any, infos: list[Any], epoch: int, chosen: Any, weights: Any, fetch: Any, verify: str
) -> Any:
    """Weights at the end of ``epoch``: the restored step's own when it is that epoch's
    end, else those of an intact checkpoint taken at that epoch's end, else None."""
    if epoch == chosen.state.get("epoch"):
        return weights
    match = [
        c
        for c in infos
        if c.readable and c.state.get("epoch") == epoch and c.state.get("epoch_done")
    ]
    if match and store.is_intact(match[-1], verify):
        return fetch(match[-1].step)[0]
    return None


def _chief_restore(
    directory: str, storage_options: Any, verify: str, model: Any, custom_objects: Any
) -> Any:
    """Chief: ``(loaded or None, corrupt steps skipped)``: the newest intact step."""
    from forge_dist.storage import CheckpointStore

    store = CheckpointStore(directory, storage_options)
    if not store.root_exists():
        return None, []  # a first run: nothing saved yet
    infos = store.list()
    skipped: list[str] = []
    chosen = None
    for info in reversed(infos):
        if store.is_intact(info, verify):
            chosen = info
            break
        skipped.append(info.name)
    if chosen is None:
        return None, skipped
    assert chosen.manifest is not None
    check_same_model(
        chosen.manifest.run.get("model_fingerprint"), model, chosen.step, store.display
    )
    state = dict(chosen.state)

    def fetch(step: int) -> tuple:
        return _fetch(store, step, model, custom_objects)

    weights, opt_values = fetch(chosen.step)
    # A callback's state may ask for the weights of an earlier epoch (EarlyStopping's
    # best); a checkpoint kept for that epoch holds them (production_callbacks keeps the
    # best one).
    restored: dict[str, Restored] = {}
    for name, cb_state in (state.get("callbacks") or {}).items():
        epoch = cb_state.get(WEIGHTS_OF_EPOCH) if isinstance(cb_state, dict) else None
        extra = None
        if epoch is not None:
            extra = _weights_of_epoch(store, infos, epoch, chosen, weights, fetch, verify)
            if extra is None:
                log.warning(
                    "no intact checkpoint of epoch %s for %s: it will use what it sees after "
                    "resuming",
                    epoch,
                    name,
                )
        restored[name] = Restored(cb_state, extra)
    run = dict(chosen.manifest.run)
    return (chosen.step, state, weights, opt_values, restored, run), skipped


def _apply(model: Any, weights: Any, opt_values: Any, state: dict[str, Any]) -> None:
    """Put the restored weights, optimizer variables and learning rate into ``model``."""
    model.set_weights(weights)
    if model.optimizer is not None and opt_values is not None:
        _compat.ensure_optimizer_built(model)
        assign_optimizer_variables(model, opt_values)
    if model.optimizer is not None and state.get("learning_rate") is not None:
        _compat.set_lr(model.optimizer, float(state["learning_rate"]))


def _position(state: dict[str, Any]) -> tuple[int, int]:
    """``(initial_epoch, initial_batch)`` to continue from ``state``."""
    epoch = state.get("epoch")
    epoch_done = state.get("epoch_done", True)
    initial = 0 if epoch is None else int(epoch) + (1 if epoch_done else 0)
    batch = state.get("batch")
    return initial, 0 if epoch_done or batch is None else int(batch) + 1


def restore_latest(
    model: Any,
    directory: str,
    storage_options: dict[str, Any] | None = None,
    communicator: Communicator | None = None,
    verify: str = "full",
    custom_objects: dict[str, Any] | None = None,
    verbose: int = 1,
) -> RestoreResult:
    """Restore ``model`` (built and compiled) on every rank from the newest intact
    checkpoint under ``directory``; return what was restored and the ``initial_epoch``.
    With no checkpoint yet, nothing changes and ``initial_epoch`` is 0. With
    ``verbose`` the chief says what it restored."""
    comm = communicator if communicator is not None else get_communicator("auto")
    if comm.multi_worker:
        import tensorflow as tf

        if tf.distribute.in_cross_replica_context() and tf.distribute.has_strategy():
            raise ConfigurationError(
                "call restore_latest outside strategy.scope(): the chief loads the checkpoint "
                "alone, and a load inside a MultiWorkerMirroredStrategy scope would need "
                "every worker"
            )
    if verify not in ("fast", "full"):
        raise ConfigurationError(f"verify must be 'fast' or 'full', got {verify!r}")
    loaded = agree(
        comm,
        "restore_latest",
        lambda: _chief_restore(directory, storage_options, verify, model, custom_objects),
    )
    loaded, skipped = loaded
    if loaded is None:
        if skipped and verbose:
            _tell(
                comm,
                f"no intact checkpoint in {redact_url(directory)}: {len(skipped)} "
                f"corrupt step(s) skipped ({', '.join(skipped)})",
            )
        return RestoreResult(False, skipped=skipped)
    step, state, weights, opt_values, restored, run = loaded
    _apply(model, weights, opt_values, state)
    registry(model).runs[root_key(directory)] = run
    set_pending(model, restored, state.get("epoch"), step, state.get("epoch_done", True))
    initial, initial_batch = _position(state)
    if verbose:
        epoch = state.get("epoch")
        where = "its end" if state.get("epoch_done", True) else f"batch {initial_batch}"
        if not state.get("epoch_done", True) and state.get("samples") is not None:
            where = f"sample {state['samples']}"
        note = f"; skipped corrupt: {', '.join(skipped)}" if skipped else ""
        _tell(
            comm,
            f"resumed from step {step} in {redact_url(directory)}: epoch {epoch + 1} at {where}"
            f" (weights, optimizer state, learning rate and callback state restored){note}",
        )
    mid_epoch = initial_batch > 0
    return RestoreResult(
        True,
        step,
        state.get("epoch"),
        initial,
        initial_batch,
        state,
        skipped,
        run,
        initial_sample=state.get("samples") if mid_epoch else None,
        world_size=state.get("world_size"),
    )


def _select(data: Any, rows: Any) -> Any:
    """The samples ``rows`` (a slice or an index array) of ``data``: arrays, or
    lists/tuples/dicts of them."""
    if data is None:
        return None
    if isinstance(data, dict):
        return {k: _select(v, rows) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_select(v, rows) for v in data)
    if not hasattr(data, "shape") or not hasattr(data, "__getitem__"):
        raise ConfigurationError(
            "fit_resumed resumes mid-epoch and shards only array inputs (NumPy arrays, or "
            f"lists or dicts of them), got {type(data).__name__}; save at epoch ends instead"
        )
    return data[rows]


def _leaves(data: Any) -> list[Any]:
    if data is None:
        return []
    if isinstance(data, dict):
        return [leaf for k in sorted(data) for leaf in _leaves(data[k])]
    if isinstance(data, (list, tuple)):
        return [leaf for v in data for leaf in _leaves(v)]
    return [data]


class _ShardPlan:
    """``fit_resumed(shard=True)``: every rank holds the whole dataset and trains on its
    part of each global batch (see :mod:`forge_dist.policy.shards`)."""

    def __init__(self, comm: Any, data: list[Any], batch_size: int) -> None:
        if comm.averages_gradients:  # a tf.distribute strategy splits the batches itself
            raise ConfigurationError(
                "shard=True is for one process per rank (mpirun, horovodrun, srun): under a "
                "tf.distribute strategy the strategy splits each batch across replicas "
                "itself; pass the whole dataset without shard="
            )
        leaves = [leaf for d in data for leaf in _leaves(d)]
        for leaf in leaves:
            if not hasattr(leaf, "shape") or not getattr(leaf, "shape", ()):
                raise ConfigurationError(
                    "shard=True needs array inputs (NumPy arrays, or lists or dicts of "
                    f"them) holding the whole dataset, got {type(leaf).__name__}"
                )
        lengths = {int(leaf.shape[0]) for leaf in leaves}
        if len(lengths) != 1:
            raise ConfigurationError(
                f"shard=True: the inputs hold different numbers of samples {sorted(lengths)}"
            )
        self.n, self.batch_size = lengths.pop(), batch_size
        self.rank, self.size = comm.rank, comm.size
        if self.size > 1:
            self._check_same_everywhere(comm, leaves)
        policy.check_shardable(self.n, 0, batch_size, self.size)

    def _check_same_everywhere(self, comm: Any, leaves: list[Any]) -> None:
        """Every rank must pass the same dataset (one all-gather of a digest: shapes,
        dtypes and up to 64 evenly spaced samples of each array)."""
        digest = hashlib.sha256()
        for leaf in leaves:
            arr = np.asarray(leaf)
            digest.update(repr((arr.shape, arr.dtype.str)).encode())
            picks = np.linspace(0, len(arr) - 1, num=min(len(arr), 64)).astype(np.int64)
            digest.update(np.ascontiguousarray(arr[picks]).tobytes())
        seen = comm.allgather(digest.hexdigest(), name="fit_resumed(shard=True) data")
        other = [r for r, d in enumerate(seen) if d != seen[0]]
        if other:
            raise ConfigurationError(
                "shard=True needs the whole dataset, the same on every rank; rank(s) "
                f"{', '.join(map(str, other))} passed other data than rank 0 (each rank's own "
                "shard? then leave shard= out)"
            )

    def fit(self, model: Any, x: Any, y: Any, offset: int, **fit_args: Any) -> Any:
        """``model.fit`` on this rank's part of ``samples[offset:]`` (then whole epochs)."""
        ranges = policy.shard_rows(self.n, offset, self.batch_size, self.size, self.rank)
        rows = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
        if fit_args.get("sample_weight") is not None:
            fit_args["sample_weight"] = _select(fit_args["sample_weight"], rows)
        reg = registry(model)
        reg.shard, reg.sample_offset = (self.n, self.batch_size, self.size), offset
        try:
            return model.fit(_select(x, rows), _select(y, rows), **fit_args)
        finally:
            reg.shard, reg.sample_offset = None, 0


def _communicator_of(callbacks: list[Any] | None) -> Any:
    """The communicator of the first forge_dist callback in the list (None: none)."""
    return next((cb.comm for cb in callbacks or [] if isinstance(cb, ForgeCallback)), None)


def _tell(comm: Any, message: str) -> None:
    log.info(message)
    if comm is None or comm.is_chief:
        print(f"[forge_dist] {message}", flush=True)


def _check_resumable(restored: RestoreResult, plan: _ShardPlan | None, size: int) -> None:
    """A mid-epoch position carries over only the way it was saved: a global sample
    offset (``shard=True``, any rank count), or each rank's batch count in its own data
    (the same rank count)."""
    where = f"step {restored.step} was saved mid-epoch"
    if restored.initial_sample is not None and plan is None:
        raise ConfigurationError(
            f"{where} by a run that trained with shard=True (at sample "
            f"{restored.initial_sample} of the epoch): pass the whole dataset with "
            "shard=True to continue it"
        )
    if restored.initial_sample is None and plan is not None:
        raise ConfigurationError(
            f"{where} by a run whose ranks each trained on their own data (at batch "
            f"{restored.initial_batch} of each rank's): continue it the same way, without "
            "shard=True"
        )
    saved = restored.world_size
    if plan is None and saved is not None and saved != size:
        raise ConfigurationError(
            f"{where} by {saved} rank(s), each on its own data, and this job has {size}: a "
            f"rank's position in its own data does not carry over to another rank count. "
            f"Resume on {saved} rank(s), or from a checkpoint taken at an epoch end; with "
            "fit_resumed(shard=True) (every rank passing the whole dataset) the position is "
            "a global sample offset that any rank count continues from"
        )


def _nothing_left(
    restored: RestoreResult, plan: _ShardPlan | None, x: Any, batch_size: int
) -> bool:
    """Whether the interrupted epoch has no sample left to train on."""
    if plan is not None:
        return (restored.initial_sample or 0) >= plan.n
    leaves = _leaves(x)
    n = int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "shape", ()) else None
    return n is not None and restored.initial_batch * batch_size >= n


def _finish_interrupted_epoch(
    model: Any,
    restored: RestoreResult,
    x: Any,
    y: Any,
    epochs: int,
    comm: Any,
    plan: _ShardPlan | None,
    args: dict[str, Any],
) -> Any:
    """The rest of the interrupted epoch: the samples its first batches did not cover,
    with the epoch's running metric totals put back first."""
    epoch, skip = restored.initial_epoch, restored.initial_batch
    batch_size = args.get("batch_size") or 32  # Keras' default batch size
    reg = registry(model)
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    offset = restored.initial_sample or 0
    # Batches counted in this epoch before the fit: at this job's size when sharded.
    before = offset // (batch_size * size) if plan is not None else skip
    reg.batch_offset, reg.partial_fit = before, epoch + 1 < epochs
    saved = values_for(restored.state.get("metric_state"), rank, size)
    first = dict(args, epochs=epoch + 1, initial_epoch=epoch)
    if saved is not None:  # the interrupted epoch's running metric totals
        first["callbacks"] = [RestoreMetricState(saved), *(args.get("callbacks") or [])]
    try:
        if plan is not None:
            return plan.fit(model, x, y, offset, **first)
        rows = slice(skip * batch_size, None)
        if first.get("sample_weight") is not None:
            first["sample_weight"] = _select(first["sample_weight"], rows)
        return model.fit(_select(x, rows), _select(y, rows), **first)
    finally:
        reg.batch_offset, reg.partial_fit = 0, False


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
    shard: bool = False,
    communicator: Communicator | None = None,
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

    With ``shard=True`` every rank passes the whole dataset (the same arrays) and trains
    on its part of each global batch of ``batch_size × ranks`` samples
    (:mod:`forge_dist.policy.shards`); a mid-epoch position is then a global sample
    offset, so a checkpoint continues on any number of ranks with every sample of the
    interrupted epoch trained on exactly once. The ranks come from ``communicator``, else
    from the first forge_dist callback, else from the launcher.
    """
    epoch = restored.initial_epoch if restored is not None else 0
    skip = restored.initial_batch if restored is not None else 0
    comm = communicator if communicator is not None else _communicator_of(callbacks)
    if shard and comm is None:
        comm = get_communicator("auto")
    size = comm.size if comm is not None else 1
    check_distributed_callbacks(callbacks or [], size)
    settings = {"epochs": epochs, "batch_size": batch_size, "shuffle": shuffle, "shard": shard}
    settings["resume_from"] = restored.step if restored is not None else None
    check_same_fit(comm, callbacks or [], settings)
    if epoch >= epochs and restored is not None and restored.restored:
        _tell(
            comm,
            f"nothing to train: the checkpoint (step {restored.step}) ends at epoch "
            f"{epoch}, and epochs={epochs}; pass a larger epochs to train on",
        )
    args = dict(fit_kwargs, batch_size=batch_size, callbacks=callbacks, shuffle=shuffle)
    plan = None
    if shard:
        if fit_kwargs.get("steps_per_epoch") is not None:
            raise ConfigurationError(
                "shard=True cuts every epoch into global batches of the whole dataset: "
                "leave steps_per_epoch out"
            )
        data = [x, y, fit_kwargs.get("sample_weight")]
        plan = _ShardPlan(comm, data, batch_size or 32)

    def fit(first_epoch: int) -> Any:
        if plan is not None:
            return plan.fit(model, x, y, 0, epochs=epochs, initial_epoch=first_epoch, **args)
        return model.fit(x, y, epochs=epochs, initial_epoch=first_epoch, **args)

    if skip == 0 or epoch >= epochs:
        return fit(epoch)
    assert restored is not None
    _check_resumable(restored, plan, size)
    if _nothing_left(restored, plan, x, batch_size or 32):
        # Saved after the epoch's last batch, before its end (save_freq=N): Keras cannot
        # run an epoch of no steps, so that epoch's end (validation, its decisions) is
        # not run again; training goes on with the next epoch.
        _tell(
            comm,
            f"step {restored.step} was saved after the last batch of epoch {epoch + 1}: "
            f"going on with epoch {epoch + 2} (epoch {epoch + 1}'s validation and "
            "end-of-epoch decisions are not repeated)",
        )
        return fit(epoch + 1) if epoch + 1 < epochs else None
    if shuffle:
        raise ConfigurationError(
            "resuming mid-epoch needs the interrupted epoch's batches in their order: "
            "pass shuffle=False"
        )
    history = _finish_interrupted_epoch(model, restored, x, y, epochs, comm, plan, args)
    if model.stop_training or epoch + 1 >= epochs:
        return history
    reg = registry(model)
    reg.keep_state = True
    try:
        return fit(epoch + 1)
    finally:
        reg.keep_state = False
