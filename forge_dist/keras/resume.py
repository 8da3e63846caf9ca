"""``fit_resumed``: ``model.fit`` that continues exactly where a restore stopped, the
interrupted epoch included, with ``shard=True`` on any number of ranks (the layout is
:mod:`forge_dist.policy.shards`)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from forge_dist import policy
from forge_dist.comm import Communicator, get_communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras._state import registry
from forge_dist.keras.callbacks.base import ForgeCallback
from forge_dist.keras.epoch_order import EpochOrder, new_seed
from forge_dist.keras.metric_state import (
    RestoreMetricState,
    build_metrics,
    metric_variables,
    values_for,
)
from forge_dist.keras.pipeline import (
    check_replayable,
    check_same_stream,
    count_samples,
    is_dataset,
    rank_batches,
    stream_digest,
)
from forge_dist.keras.restore import RestoreResult, tell
from forge_dist.keras.stack import check_distributed_callbacks, check_same_fit


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


def _one_process_per_rank(comm: Any) -> None:
    if comm.averages_gradients:  # a tf.distribute strategy splits the batches itself
        raise ConfigurationError(
            "shard=True is for one process per rank (mpirun, horovodrun, srun): under a "
            "tf.distribute strategy the strategy splits each batch across replicas "
            "itself; pass the whole dataset without shard="
        )


def _same_on_every_rank(comm: Any, digest: str, what: str, differ: str) -> None:
    """One all-gather of the ranks' digests of their data; on every rank, an error
    naming the ranks whose data differ from rank 0's."""
    seen = comm.allgather(digest, name="fit_resumed(shard=True) data")
    other = [r for r, d in enumerate(seen) if d != seen[0]]
    if other:
        raise ConfigurationError(
            f"shard=True needs {what}, the same on every rank; rank(s) "
            f"{', '.join(map(str, other))} {differ}"
        )


class _ShardPlan:
    """``fit_resumed(shard=True)``: every rank holds the whole dataset and trains on its
    part of each global batch (see :mod:`forge_dist.policy.shards`)."""

    def __init__(self, comm: Any, data: list[Any], batch_size: int) -> None:
        _one_process_per_rank(comm)
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
        _same_on_every_rank(
            comm,
            digest.hexdigest(),
            "the whole dataset",
            "passed other data than rank 0 (each rank's own shard? then leave shard= out)",
        )

    def fit(
        self, model: Any, x: Any, y: Any, offset: int, rows: Any = None, **fit_args: Any
    ) -> Any:
        """``model.fit`` on this rank's part of ``samples[offset:]`` (then whole epochs);
        ``rows``: those samples already chosen (a shuffled epoch's)."""
        if rows is None:
            ranges = policy.shard_rows(self.n, offset, self.batch_size, self.size, self.rank)
            rows = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
        if fit_args.get("sample_weight") is not None:
            fit_args["sample_weight"] = _select(fit_args["sample_weight"], rows)
        with self.positions(model, offset):
            return model.fit(_select(x, rows), _select(y, rows), **fit_args)

    @contextlib.contextmanager
    def positions(self, model: Any, offset: int) -> Iterator[None]:
        """Around a fit: checkpoints record positions as global sample offsets."""
        reg = registry(model)
        reg.shard, reg.sample_offset = (self.n, self.batch_size, self.size), offset
        try:
            yield
        finally:
            reg.shard, reg.sample_offset = None, 0


class _PipelineShardPlan(_ShardPlan):
    """``fit_resumed(shard=True)`` on a ``tf.data`` pipeline, the same on every rank: its
    samples (batched pipelines are unbatched) form one stream, cut like arrays into
    global batches of ``batch_size × ranks`` (``batch_size``: else the pipeline's own
    batch size), so a position is again a global sample offset."""

    def __init__(self, comm: Any, dataset: Any, batch_size: int | None) -> None:
        _one_process_per_rank(comm)
        check_same_stream(dataset)
        if batch_size is None:  # the pipeline's own: its first batch's
            first = next(iter(dataset.take(1)), None)
            if first is None:
                raise ConfigurationError("shard=True: the tf.data pipeline yields nothing")
            batch_size = int(_leaves(first)[0].shape[0])
        self.samples = dataset.unbatch()
        self.n, self.batch_size = count_samples(self.samples), batch_size
        self.rank, self.size = comm.rank, comm.size
        if self.size > 1:
            _same_on_every_rank(
                comm,
                stream_digest(self.samples, self.n),
                "the tf.data pipeline",
                "read other samples than rank 0. Each rank's own shard? Then leave shard= "
                "out. A seeded shuffle also follows the global seed (tf.random.set_seed, "
                "keras.utils.set_random_seed): build the pipeline under the same one on "
                "every rank",
            )
        policy.check_shardable(self.n, 0, batch_size, self.size)

    def fit(
        self, model: Any, x: Any, y: Any, offset: int, rows: Any = None, **fit_args: Any
    ) -> Any:
        policy.check_shardable(self.n, offset, self.batch_size, self.size)
        batches = rank_batches(self.samples, self.n, offset, self.batch_size, self.rank, self.size)
        fit_args.pop("batch_size", None)
        fit_args["shuffle"] = False  # (the pipeline orders itself)
        if fit_args.get("validation_batch_size") is None:
            fit_args["validation_batch_size"] = self.batch_size
        with self.positions(model, offset):
            return model.fit(batches, **fit_args)


def _communicator_of(callbacks: list[Any] | None) -> Any:
    """The communicator of the first forge_dist callback in the list (None: none)."""
    return next((cb.comm for cb in callbacks or [] if isinstance(cb, ForgeCallback)), None)


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
            f"Resume on {saved} rank(s), or from the newest checkpoint taken at an epoch end "
            "(restore_latest(..., epoch_end_only=True); scripts/train.py "
            "--resume-epoch-end); with fit_resumed(shard=True) (every rank passing the whole "
            "dataset) the position is a global sample offset that any rank count continues "
            "from"
        )


def _nothing_left(
    restored: RestoreResult, plan: _ShardPlan | None, x: Any, batch_size: int
) -> bool:
    """Whether the interrupted epoch has no sample left to train on."""
    if plan is not None:
        return (restored.initial_sample or 0) >= plan.n
    if is_dataset(x):
        batches = int(x.cardinality())
        return batches >= 0 and restored.initial_batch >= batches
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
    order: EpochOrder | None = None,
) -> Any:
    """The rest of the interrupted epoch: the samples its first batches did not cover
    (in the epoch's own order when shuffled), with the epoch's running metric totals put
    back first."""
    epoch, skip = restored.initial_epoch, restored.initial_batch
    batch_size = args.get("batch_size") or 32  # Keras' default batch size
    if plan is not None:
        batch_size = plan.batch_size
    reg = registry(model)
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    offset = restored.initial_sample or 0
    # Batches counted in this epoch before the fit: at this job's size when sharded.
    before = offset // (batch_size * size) if plan is not None else skip
    reg.batch_offset, reg.partial_fit = before, epoch + 1 < epochs
    reg.display_epochs = epochs  # (this fit runs one epoch; the bar says "Epoch 4/10")
    metric_state = restored.state.get("metric_state")
    saved = values_for(metric_state, rank, size)
    first = dict(args, epochs=epoch + 1, initial_epoch=epoch)
    if saved is not None:  # the interrupted epoch's running metric totals
        if len(metric_variables(model)) < len(saved):  # a new process: not built yet
            one = slice(0, 1)
            if is_dataset(x):  # its first batch: (x, y) or (x, y, sample_weight)
                first_batch = next(iter(x.take(1)))
                parts = [_select(p, one) for p in first_batch] + [None]
                build_metrics(model, parts[0], parts[1], parts[2])
            else:
                sample_weight = _select(args.get("sample_weight"), one)
                build_metrics(model, _select(x, one), _select(y, one), sample_weight)
        names = metric_state.get("names")
        first["callbacks"] = [RestoreMetricState(saved, names), *(args.get("callbacks") or [])]
    if order is not None:
        first["shuffle"] = False  # (the rows come in the epoch's order)
    try:
        if plan is not None:
            rows = None if order is None else order.rows(epoch, offset, batch_size)
            return plan.fit(model, x, y, offset, rows=rows, **first)
        if is_dataset(x):  # a replayable pipeline (checked): the same batches again
            return model.fit(x.skip(skip), **{k: v for k, v in first.items() if k != "batch_size"})
        rows = slice(skip * batch_size, None)
        if order is not None:
            rows = order.rows(epoch, skip * batch_size, batch_size)
        if first.get("sample_weight") is not None:
            first["sample_weight"] = _select(first["sample_weight"], rows)
        return model.fit(_select(x, rows), _select(y, rows), **first)
    finally:
        reg.batch_offset, reg.partial_fit, reg.display_epochs = 0, False, None


def _arrays(data: Any) -> bool:
    """Array inputs (NumPy arrays or tensors, or lists/tuples/dicts of them)."""
    leaves = _leaves(data)
    return bool(leaves) and all(
        hasattr(leaf, "shape") and getattr(leaf, "shape", ()) and hasattr(leaf, "__getitem__")
        for leaf in leaves
    )


def _split_validation(x: Any, y: Any, args: dict[str, Any]) -> tuple[Any, Any]:
    """Keras' ``validation_split``, taken here (the last fraction, before any shuffling)
    because the shuffled epochs are fed as a dataset, which Keras cannot split."""
    split = args.pop("validation_split", None)
    if not split:
        return x, y
    if args.get("validation_data") is not None:
        raise ConfigurationError("pass validation_data or validation_split, not both")
    n = int(_leaves(x)[0].shape[0])
    at = int(np.floor(n * (1.0 - float(split))))
    sw = args.get("sample_weight")
    train, held = slice(0, at), slice(at, n)
    val = (_select(x, held), _select(y, held))
    if sw is not None:
        val, args["sample_weight"] = (*val, _select(sw, held)), _select(sw, train)
    args["validation_data"] = val
    return _select(x, train), _select(y, train)


def fit_resumed(
    model: Any,
    restored: RestoreResult | None,
    x: Any = None,
    y: Any = None,
    *,
    batch_size: int | None = None,
    epochs: int = 1,
    callbacks: list[Any] | None = None,
    shuffle: bool = True,
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
    the one an uninterrupted run would have reached. Returns the last fit's History.

    ``shuffle=True`` (Keras' default) with array inputs gives every epoch its own random
    order from a seed recorded in every checkpoint (:mod:`forge_dist.keras.epoch_order`):
    a resumed epoch goes on with the samples of that order it had not reached, each
    trained once. ``shuffle=False`` keeps the arrays' order.

    With ``shard=True`` every rank passes the whole dataset (the same arrays) and trains
    on its part of each global batch of ``batch_size × ranks`` samples
    (:mod:`forge_dist.policy.shards`); a mid-epoch position is then a global sample
    offset, so a checkpoint continues on any number of ranks with every sample of the
    interrupted epoch trained on exactly once. A ``tf.data`` pipeline, the same on every
    rank, is cut the same way (its samples one stream; ``batch_size``: the pipeline's
    own unless given). The ranks come from ``communicator``, else
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
        tell(
            comm,
            f"nothing to train: the checkpoint (step {restored.step}) ends at epoch "
            f"{epoch}, and epochs={epochs}; pass a larger epochs to train on",
        )
    args = dict(fit_kwargs, batch_size=batch_size, callbacks=callbacks, shuffle=shuffle)
    if is_dataset(x):  # a pipeline orders itself (Keras would warn that it ignores shuffle)
        args["shuffle"] = False
    ordered = bool(shuffle) and _arrays(x)
    if ordered:
        if fit_kwargs.get("steps_per_epoch") is not None:
            raise ConfigurationError(
                "shuffle=True with array inputs orders whole epochs: leave steps_per_epoch "
                "out (or pass shuffle=False)"
            )
        x, y = _split_validation(x, y, args)
    plan = None
    if shard:
        if fit_kwargs.get("steps_per_epoch") is not None:
            raise ConfigurationError(
                "shard=True cuts every epoch into global batches of the whole dataset: "
                "leave steps_per_epoch out"
            )
        if is_dataset(x):
            plan = _PipelineShardPlan(comm, x, batch_size)
        else:
            plan = _ShardPlan(comm, [x, y, args.get("sample_weight")], batch_size or 32)
    order = None
    if ordered:
        seed = restored.state.get("data_seed") if restored is not None else None
        if seed is None:
            seed = new_seed(comm)
        registry(model).data_seed = int(seed)
        n = plan.n if plan is not None else int(_leaves(x)[0].shape[0])
        where = (plan.n, plan.size) if plan is not None else None
        order = EpochOrder(int(seed), n, comm.rank if comm is not None else 0, where)

    def fit(first_epoch: int) -> Any:
        if order is not None:
            return _fit_ordered(model, order, x, y, first_epoch, epochs, plan, args)
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
        tell(
            comm,
            f"step {restored.step} was saved after the last batch of epoch {epoch + 1}: "
            f"going on with epoch {epoch + 2} (epoch {epoch + 1}'s validation and "
            "end-of-epoch decisions are not repeated)",
        )
        return fit(epoch + 1) if epoch + 1 < epochs else None
    if is_dataset(x):
        check_replayable(x, restored.step)
    elif shuffle and order is None:
        raise ConfigurationError(
            "resuming mid-epoch needs the interrupted epoch's batches in their order: "
            "array inputs (shuffled by fit_resumed), or shuffle=False"
        )
    history = _finish_interrupted_epoch(model, restored, x, y, epochs, comm, plan, args, order)
    if model.stop_training or epoch + 1 >= epochs:
        return history
    reg = registry(model)
    reg.keep_state = True
    try:
        return fit(epoch + 1)
    finally:
        reg.keep_state = False


def _fit_ordered(
    model: Any,
    order: EpochOrder,
    x: Any,
    y: Any,
    first_epoch: int,
    epochs: int,
    plan: _ShardPlan | None,
    args: dict[str, Any],
) -> Any:
    """Epochs ``first_epoch..`` as one fit on a dataset of each epoch's ordered batches."""
    batch_size = args.get("batch_size") or 32
    rest = {k: v for k, v in args.items() if k not in ("batch_size", "shuffle", "sample_weight")}
    sw = args.get("sample_weight")
    arrays = (x, y) if sw is None else (x, y, sw)
    ds, steps = order.dataset(arrays, first_epoch, epochs, batch_size)
    fit_args = dict(rest, epochs=epochs, initial_epoch=first_epoch, steps_per_epoch=steps)
    fit_args["shuffle"] = False  # (the dataset is in order already; Keras would warn)
    # Keras validates in batches of validation_batch_size, else batch_size: the same
    # batches as the arrays' fit would, or validation totals differ in the last bits.
    if fit_args.get("validation_batch_size") is None and args.get("batch_size"):
        fit_args["validation_batch_size"] = args["batch_size"]
    if plan is None:
        return model.fit(ds, **fit_args)
    with plan.positions(model, 0):
        return model.fit(ds, **fit_args)
