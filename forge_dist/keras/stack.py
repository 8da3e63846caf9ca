"""``production_callbacks``: the recommended stack, in the order that makes it correct."""

from __future__ import annotations

from typing import Any

from forge_dist.keras.callbacks import (
    BroadcastInitialState,
    ChiefCSVLogger,
    ChiefModelCheckpoint,
    ConsistencyGuard,
    PreemptionCheckpoint,
    SyncEarlyStopping,
    SyncMetrics,
    SyncReduceLROnPlateau,
)
from forge_dist.preemption import DEFAULT_SIGNALS

#: Where the CSV goes by default, beside the steps (readers ignore it).
HISTORY_CSV = "history.csv"


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
    guard_every_n_epochs: int | None = 1,
    preemption_signals: Any = DEFAULT_SIGNALS,
    preemption_check_every_n_batches: int | str = "auto",
    validation_samples: Any = None,
    storage_options: dict[str, Any] | None = None,
    communicator: Any = None,
    verbose: int = 1,
) -> list[Any]:
    """The recommended stack, in the order that makes it correct:

    initial-state broadcast, metric sync, plateau, early stop, checkpoint, CSV, guard,
    preemption. The CSV defaults to ``<directory>/history.csv`` (beside the steps;
    readers ignore it). On any of ``preemption_signals`` (to any rank) the job saves once
    and every rank exits with 75 (:class:`PreemptionCheckpoint`). Pass
    ``reduce_lr_patience=None``, ``guard_every_n_epochs=None`` or
    ``preemption_signals=None`` to leave those out.
    """
    cbs: list[Any] = [
        BroadcastInitialState(communicator=communicator),
        SyncMetrics(communicator=communicator, validation_samples=validation_samples),
    ]
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
    cbs.append(
        ChiefCSVLogger(
            csv_url or directory.rstrip("/") + "/" + HISTORY_CSV,
            storage_options=storage_options,
            communicator=communicator,
        )
    )
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
