"""``production_callbacks``: the recommended stack, in the order that makes it correct;
and the check that keeps single-process Keras callbacks out of a distributed fit."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from forge_dist.errors import ConfigurationError
from forge_dist.keras.callbacks import (
    BroadcastInitialState,
    ChiefCSVLogger,
    ChiefModelCheckpoint,
    ChiefTensorBoard,
    ConsistencyGuard,
    DerivedMetric,
    ForgeCallback,
    OnChief,
    PreemptionCheckpoint,
    SyncEarlyStopping,
    SyncMetrics,
    SyncReduceLROnPlateau,
    SyncTerminateOnNaN,
)
from forge_dist.preemption import DEFAULT_SIGNALS

#: Where the CSV goes by default, beside the steps (readers ignore it).
HISTORY_CSV = "history.csv"

#: Keras callbacks that go wrong when every rank runs them, and what to use instead.
REPLACEMENTS = {
    "EarlyStopping": "forge_dist.keras.SyncEarlyStopping",
    "ReduceLROnPlateau": "forge_dist.keras.SyncReduceLROnPlateau",
    "ModelCheckpoint": "forge_dist.keras.ChiefModelCheckpoint",
    "BackupAndRestore": "forge_dist.keras.restore_latest with ChiefModelCheckpoint",
    "CSVLogger": "forge_dist.keras.ChiefCSVLogger",
    "TensorBoard": "forge_dist.keras.ChiefTensorBoard",
    "TerminateOnNaN": "forge_dist.keras.SyncTerminateOnNaN",
}


def _replaceable(cb: Any) -> str | None:
    """The name of Keras' own callback ``cb`` if forge_dist has a replacement for it."""
    name = type(cb).__name__
    own = type(cb).__module__.startswith(("keras.", "tf_keras."))
    return name if own and name in REPLACEMENTS else None


def check_distributed_callbacks(callbacks: Iterable[Any], size: int) -> None:
    """Refuse, on every rank, the plain Keras callbacks that break a job of ``size`` > 1
    ranks (each rank would decide or write on its own), naming the replacement."""
    if size <= 1:
        return
    for cb in callbacks:
        if name := _replaceable(cb):
            raise ConfigurationError(
                f"keras.callbacks.{name} runs on every rank on its own in a job of {size} "
                f"ranks (different decisions, the same file written twice, or one rank "
                f"stopping while the others wait); use {REPLACEMENTS[name]}"
            )


def _describe(cb: Any) -> str:
    name = type(cb).__name__
    inner = getattr(cb, "name", None) if isinstance(cb, OnChief) else None
    return f"{name}({inner})" if inner else name


def check_same_fit(comm: Any, callbacks: Iterable[Any], settings: dict[str, Any]) -> None:
    """Every rank must run the same fit: the same forge_dist callbacks in the same order
    (each one's collectives must line up with the other ranks') and the same settings
    (epochs, batch size, ...). One all-gather, before anything else collective; a
    difference is an error on every rank at once instead of ranks waiting for each
    other in different collectives until the deadline."""
    if comm is None or comm.size <= 1:
        return
    mine = {
        "callbacks": [_describe(cb) for cb in callbacks if isinstance(cb, ForgeCallback)],
        "settings": {k: repr(v) for k, v in sorted(settings.items())},
    }
    seen = comm.allgather(mine, name="fit_resumed(the fit every rank runs)")
    for rank, theirs in enumerate(seen):
        if theirs == seen[0]:
            continue
        for part in ("callbacks", "settings"):
            if theirs[part] != seen[0][part]:
                raise ConfigurationError(
                    f"every rank must run the same fit, but rank {rank}'s {part} differ from "
                    f"rank 0's: {theirs[part]} vs {seen[0][part]}"
                )


def wrap_extra(extra: Iterable[Any], communicator: Any) -> list[Any]:
    """The user's own callbacks: forge_dist ones as they are, Keras' TerminateOnNaN as
    SyncTerminateOnNaN, every other Keras callback once, on the chief (:class:`OnChief`)."""
    out: list[Any] = []
    for cb in extra:
        if isinstance(cb, ForgeCallback):
            out.append(cb)
        elif (name := _replaceable(cb)) == "TerminateOnNaN":
            out.append(SyncTerminateOnNaN(communicator=communicator))
        elif name:
            raise ConfigurationError(
                f"production_callbacks already holds the distributed {name}: set it through "
                f"production_callbacks' arguments (or use {REPLACEMENTS[name]})"
            )
        else:
            out.append(OnChief(cb, communicator=communicator))
    return out


def production_callbacks(
    directory: str,
    monitor: str = "val_loss",
    mode: str = "auto",
    *,
    patience: int = 5,
    min_delta: float = 0.0,
    restore_best_weights: bool = True,
    reduce_lr_patience: int | None = 2,
    reduce_lr_factor: float = 0.5,
    min_lr: float = 0.0,
    save_best_only: bool = False,
    save_weights_only: bool = False,
    async_save: bool = False,
    keep_last: int | None = 2,
    keep_best: int | None = 1,
    csv_url: str | None = None,
    tensorboard_dir: str | None = None,
    terminate_on_nan: bool = True,
    derived: Iterable[DerivedMetric] = (),
    extra: Iterable[Any] = (),
    guard_every_n_epochs: int | None = 1,
    preemption_signals: Any = DEFAULT_SIGNALS,
    preemption_check_every_n_batches: int | str = "auto",
    validation_samples: Any = None,
    storage_options: dict[str, Any] | None = None,
    communicator: Any = None,
    verbose: int = 1,
) -> list[Any]:
    """The recommended stack, in the order that makes it correct:

    initial-state broadcast, metric sync, ``derived`` metrics (:class:`DerivedMetric`:
    monitors computed from the synced logs), NaN guard, plateau, early stop, CSV,
    TensorBoard (with ``tensorboard_dir``), checkpoint, your ``extra`` callbacks, weight
    guard, preemption. The loggers come before the checkpoint, so a checkpoint never
    covers an epoch its logs lack. ``extra`` callbacks run once, on the chief, with the
    synced logs and the epoch's decisions taken (:class:`OnChief`), before a preemption
    at that epoch's end stops the job. The CSV defaults to ``<directory>/history.csv``
    (beside the steps; readers ignore it). On any of ``preemption_signals`` (to any
    rank) the job saves once and every rank exits with 75. Pass
    ``reduce_lr_patience=None``, ``guard_every_n_epochs=None``,
    ``terminate_on_nan=False`` or ``preemption_signals=None`` to leave those out.
    """
    cbs: list[Any] = [
        BroadcastInitialState(communicator=communicator),
        SyncMetrics(communicator=communicator, validation_samples=validation_samples),
    ]
    for d in derived:
        if not isinstance(d, DerivedMetric):
            raise ConfigurationError(f"derived takes DerivedMetric callbacks, got {d!r}")
        cbs.append(d)
    if terminate_on_nan:
        cbs.append(SyncTerminateOnNaN(communicator=communicator, verbose=verbose))
    if reduce_lr_patience is not None:
        cbs.append(
            SyncReduceLROnPlateau(
                monitor=monitor,
                mode=mode,
                patience=reduce_lr_patience,
                factor=reduce_lr_factor,
                min_lr=min_lr,
                verbose=verbose,
                communicator=communicator,
            )
        )
    cbs.append(
        SyncEarlyStopping(
            monitor=monitor,
            mode=mode,
            patience=patience,
            min_delta=min_delta,
            restore_best_weights=restore_best_weights,
            verbose=verbose,
            communicator=communicator,
        )
    )
    cbs.append(
        ChiefCSVLogger(
            csv_url or directory.rstrip("/") + "/" + HISTORY_CSV,
            storage_options=storage_options,
            communicator=communicator,
        )
    )
    if tensorboard_dir is not None:
        cbs.append(
            ChiefTensorBoard(
                tensorboard_dir, storage_options=storage_options, communicator=communicator
            )
        )
    checkpoint = ChiefModelCheckpoint(
        directory,
        monitor=monitor,
        mode=mode,
        save_best_only=save_best_only,
        save_weights_only=save_weights_only,
        async_save=async_save,
        keep_last=keep_last,
        keep_best=keep_best,
        verbose=verbose,
        storage_options=storage_options,
        communicator=communicator,
    )
    cbs.append(checkpoint)
    for cb in wrap_extra(extra, communicator):
        if not (terminate_on_nan and isinstance(cb, SyncTerminateOnNaN)):
            cbs.append(cb)  # (a TerminateOnNaN in extra is the one already in the stack)
    if guard_every_n_epochs is not None:
        cbs.append(ConsistencyGuard(every_n_epochs=guard_every_n_epochs, communicator=communicator))
    if preemption_signals is not None:
        cbs.append(
            PreemptionCheckpoint(
                checkpoint,
                preemption_signals,
                check_every_n_batches=preemption_check_every_n_batches,
                communicator=communicator,
                verbose=verbose,
            )
        )
    return cbs
