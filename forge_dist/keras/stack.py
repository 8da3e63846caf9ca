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
from forge_dist.keras.fit import REPLACEMENTS, describe, replaceable
from forge_dist.preemption import DEFAULT_SIGNALS

#: Where the CSV goes by default, beside the steps (readers ignore it).
HISTORY_CSV = "history.csv"


def check_distributed_callbacks(callbacks: Iterable[Any], size: int) -> None:
    """Refuse, on every rank, the plain Keras callbacks that break a job of ``size`` > 1
    ranks (each rank would decide or write on its own), naming the replacement."""
    if size <= 1:
        return
    for cb in callbacks:
        if name := replaceable(cb):
            raise ConfigurationError(
                f"keras.callbacks.{name} runs on every rank on its own in a job of {size} "
                f"ranks (different decisions, the same file written twice, or one rank "
                f"stopping while the others wait); use {REPLACEMENTS[name]}"
            )


def check_same_fit(comm: Any, callbacks: Iterable[Any], settings: dict[str, Any]) -> None:
    """Every rank must run the same fit: the same forge_dist callbacks in the same order
    (each one's collectives must line up with the other ranks') and the same settings
    (epochs, batch size, ...). One all-gather, before anything else collective; a
    difference is an error on every rank at once instead of ranks waiting for each
    other in different collectives until the deadline."""
    if comm is None or comm.size <= 1:
        return
    mine = {
        "callbacks": [describe(cb) for cb in callbacks if isinstance(cb, ForgeCallback)],
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
        elif (name := replaceable(cb)) == "TerminateOnNaN":
            raise_error = bool(getattr(cb, "raise_error", False))
            out.append(SyncTerminateOnNaN(raise_error=raise_error, communicator=communicator))
        elif name:
            raise ConfigurationError(
                f"production_callbacks already holds the distributed {name}: set it through "
                f"production_callbacks' arguments (or use {REPLACEMENTS[name]})"
            )
        else:
            out.append(OnChief(cb, communicator=communicator))
    return out


def _settings(what: str, given: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` (from production_callbacks' own arguments) under the user's ``what=``
    dict (the callback's own argument names, Keras' where Keras has them)."""
    if given is None:
        return defaults
    if not isinstance(given, dict):
        raise ConfigurationError(
            f"production_callbacks({what}=...) takes a dict of that callback's arguments, "
            f"got {type(given).__name__}"
        )
    if "communicator" in given:
        raise ConfigurationError(
            f"production_callbacks({what}=...): pass communicator= to production_callbacks"
        )
    return {**defaults, **given}


def _make(what: str, cls: type, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)``; an argument it does not take is one error naming the dict."""
    try:
        return cls(**kwargs)
    except TypeError as e:
        import inspect

        known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ConfigurationError(
            f"production_callbacks({what}={{...}}): {cls.__name__} {e}; its arguments are: "
            + ", ".join(known)
        ) from None


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
    run_name: str | None = None,
    overwrite: str | None = None,
    checkpoint: dict[str, Any] | None = None,
    early_stopping: dict[str, Any] | None = None,
    reduce_lr: dict[str, Any] | None = None,
    tensorboard: dict[str, Any] | None = None,
    csv: dict[str, Any] | None = None,
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

    ``monitor`` and ``mode`` are every decision's; each callback's own settings go in a
    dict of its arguments, over the ones above: ``checkpoint={"monitor": "val_accuracy",
    "save_best_only": True}`` (:class:`ChiefModelCheckpoint`),
    ``early_stopping={"monitor": "val_loss", "patience": 3}`` (:class:`SyncEarlyStopping`),
    ``reduce_lr={...}`` (:class:`SyncReduceLROnPlateau`), ``tensorboard={"histogram_freq":
    1}`` (:class:`ChiefTensorBoard`, written when ``tensorboard_dir`` or its ``log_dir``
    is given), ``csv={"append": True}`` (:class:`ChiefCSVLogger`). ``run_name`` and
    ``overwrite`` go to the checkpoint.
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
    common = {"monitor": monitor, "mode": mode, "verbose": verbose, "communicator": communicator}
    if reduce_lr_patience is not None or reduce_lr is not None:
        plateau = {"patience": reduce_lr_patience, "factor": reduce_lr_factor, "min_lr": min_lr}
        if reduce_lr_patience is None:
            plateau.pop("patience")
        cbs.append(
            _make(
                "reduce_lr",
                SyncReduceLROnPlateau,
                _settings("reduce_lr", reduce_lr, {**common, **plateau}),
            )
        )
    stop = {"patience": patience, "min_delta": min_delta}
    stop["restore_best_weights"] = restore_best_weights
    cbs.append(
        _make(
            "early_stopping",
            SyncEarlyStopping,
            _settings("early_stopping", early_stopping, {**common, **stop}),
        )
    )
    files = {"storage_options": storage_options, "communicator": communicator}
    csv_defaults = {"filename": csv_url or directory.rstrip("/") + "/" + HISTORY_CSV, **files}
    cbs.append(_make("csv", ChiefCSVLogger, _settings("csv", csv, csv_defaults)))
    if tensorboard_dir is not None or (tensorboard or {}).get("log_dir") is not None:
        tb = _settings("tensorboard", tensorboard, {"log_dir": tensorboard_dir, **files})
        cbs.append(_make("tensorboard", ChiefTensorBoard, tb))
    elif tensorboard is not None:
        raise ConfigurationError(
            "production_callbacks(tensorboard={...}) needs a folder: pass tensorboard_dir= "
            "(or log_dir in the dict)"
        )
    saving = {
        "directory": directory,
        "save_best_only": save_best_only,
        "save_weights_only": save_weights_only,
        "async_save": async_save,
        "keep_last": keep_last,
        "keep_best": keep_best,
        "run_name": run_name,
        "overwrite": overwrite,
        **files,
    }
    ckpt = _make(
        "checkpoint",
        ChiefModelCheckpoint,
        _settings("checkpoint", checkpoint, {**common, **saving}),
    )
    if ckpt.filepath is not None:
        raise ConfigurationError(
            f"production_callbacks(directory={directory!r}) is the folder the resumable steps "
            "go in, not a Keras file path; add a ChiefModelCheckpoint(filepath=...) of your "
            "own to extra=[...] for a file"
        )
    ckpt.overwrite_remedy = (
        "pass overwrite='archive' (local roots: the old steps move to an archive-* folder) or "
        "overwrite='delete' to production_callbacks"
    )
    cbs.append(ckpt)
    for cb in wrap_extra(extra, communicator):
        if not (terminate_on_nan and isinstance(cb, SyncTerminateOnNaN)):
            cbs.append(cb)  # (a TerminateOnNaN in extra is the one already in the stack)
    if guard_every_n_epochs is not None:
        cbs.append(ConsistencyGuard(every_n_epochs=guard_every_n_epochs, communicator=communicator))
    if preemption_signals is not None:
        cbs.append(
            PreemptionCheckpoint(
                ckpt,
                preemption_signals,
                check_every_n_batches=preemption_check_every_n_batches,
                communicator=communicator,
                verbose=verbose,
            )
        )
    return cbs
