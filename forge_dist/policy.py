"""Pure decisions: no TensorFlow, no I/O. Unit-tested with plain lists.

Each rule takes a frozen config, the previous state and this epoch's facts, and returns
a decision holding the *new* state, a reason and a readable message; the Keras adapters
in :mod:`forge_dist.keras` only gather the facts, agree on them across ranks and act.

The semantics are Keras 3's ``EarlyStopping``, ``ReduceLROnPlateau`` and
``ModelCheckpoint(save_best_only=True)`` (same ``min_delta`` sign, baseline, wait and
cooldown counters), with one deliberate difference: a NaN is never an improvement, not
even as the first value (Keras 3 would adopt it as "best" and never improve again).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from forge_dist.errors import ConfigurationError

MODES = ("min", "max")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def resolve_mode(monitor: str, mode: str = "auto", metric_direction: str | None = None) -> str:
    """``"min"`` or ``"max"`` for ``monitor``.

    ``mode="auto"`` follows Keras: a loss is minimised; a metric whose object declares a
    direction (Keras 3's ``_direction``: ``"up"``/``"down"``) follows it; names ending in
    ``acc``, ``accuracy`` or ``auc`` are maximised (tf_keras' rule). Anything else is a
    :class:`ConfigurationError`, as in Keras 3, instead of a silent guess.
    """
    check_monitor(monitor)
    if mode in MODES:
        return mode
    if mode != "auto":
        raise ConfigurationError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    name = monitor.removeprefix("val_")
    if metric_direction in ("up", "down"):
        return "max" if metric_direction == "up" else "min"
    if name == "loss" or name.endswith("loss"):
        return "min"
    if name.endswith(("acc", "accuracy", "auc")):
        return "max"
    raise ConfigurationError(
        f"cannot tell whether {monitor!r} should be minimised or maximised; "
        "pass mode='min' or mode='max'"
    )


def check_monitor(monitor: object) -> str:
    if not isinstance(monitor, str) or not monitor.strip():
        raise ConfigurationError(
            f"monitor must be a metric name such as 'val_loss', got {monitor!r}"
        )
    return monitor


def _check_number(
    name: str, value: object, *, minimum: float | None = None, integer: bool = False
) -> None:
    ok_type = (int,) if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, ok_type)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        kind = "an integer" if integer else "a finite number"
        raise ConfigurationError(f"{name} must be {kind}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value!r}")


def is_improvement(
    current: float | None, reference: float | None, mode: str, min_delta: float = 0.0
) -> bool:
    """Keras' test: ``current - min_delta > reference`` (max) or ``current + min_delta <
    reference`` (min); with no reference yet, any value is an improvement. A missing or
    NaN ``current`` never is."""
    if current is None or math.isnan(current):
        return False
    if reference is None or math.isnan(reference):
        return True
    delta = abs(min_delta)
    if mode == "min":
        return current + delta < reference
    return current - delta > reference


class Reason(enum.Enum):
    NOT_MONITORED = "not monitored yet"  # before start_from_epoch, or no value
    IMPROVED = "improved"
    IMPROVED_BELOW_BASELINE = "improved, but not past the baseline"
    WAITING = "no improvement"
    COOLDOWN = "in cooldown"
    STOP = "patience exhausted"
    REDUCE_LR = "plateau: reducing the learning rate"
    AT_MIN_LR = "plateau, but the learning rate is already at min_lr"
    SAVE = "save"
    SKIP = "not saved"


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.6g}"


# --------------------------------------------------------------------------- early stop
@dataclass(frozen=True)
class EarlyStopConfig:
    monitor: str = "val_loss"
    mode: str = "min"  # resolved: "min" or "max"
    min_delta: float = 0.0
    patience: int = 0
    baseline: float | None = None
    start_from_epoch: int = 0
    restore_best_weights: bool = False

    def __post_init__(self) -> None:
        check_monitor(self.monitor)
        check_mode(self.mode)
        _check_number("min_delta", self.min_delta)
        _check_number("patience", self.patience, minimum=0, integer=True)
        _check_number("start_from_epoch", self.start_from_epoch, minimum=0, integer=True)
        if self.baseline is not None:
            _check_number("baseline", self.baseline)


@dataclass(frozen=True)
class EarlyStopState:
    wait: int = 0
    best: float | None = None
    best_epoch: int = 0
    stopped_epoch: int = 0
    has_best_weights: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "has_best_weights": self.has_best_weights,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> EarlyStopState:
        best = d.get("best")
        return cls(
            wait=int(d.get("wait", 0)),
            best=None if best is None else float(best),
            best_epoch=int(d.get("best_epoch", 0)),
            stopped_epoch=int(d.get("stopped_epoch", 0)),
            has_best_weights=bool(d.get("has_best_weights", False)),
        )


@dataclass(frozen=True)
class EarlyStopDecision:
    state: EarlyStopState
    reason: Reason
    stop: bool = False
    snapshot_weights: bool = False  # take the current weights as the best ones
    message: str = ""


def early_stop_step(
    config: EarlyStopConfig, state: EarlyStopState, epoch: int, current: float | None
) -> EarlyStopDecision:
    """One epoch of Keras 3's ``EarlyStopping.on_epoch_end``."""
    if current is None or epoch < config.start_from_epoch:
        return EarlyStopDecision(
            state,
            Reason.NOT_MONITORED,
            message=f"epoch {epoch}: {config.monitor} not monitored yet",
        )
    snapshot = False
    new = state
    if config.restore_best_weights and not state.has_best_weights:
        snapshot = True
        new = replace(new, has_best_weights=True, best_epoch=epoch)
    new = replace(new, wait=new.wait + 1)
    if is_improvement(current, state.best, config.mode, config.min_delta):
        new = replace(
            new,
            best=current,
            best_epoch=epoch,
            has_best_weights=new.has_best_weights or config.restore_best_weights,
        )
        past_baseline = config.baseline is None or is_improvement(
            current, config.baseline, config.mode, config.min_delta
        )
        if past_baseline:
            new = replace(new, wait=0)
        reason = Reason.IMPROVED if past_baseline else Reason.IMPROVED_BELOW_BASELINE
        return EarlyStopDecision(
            new,
            reason,
            snapshot_weights=config.restore_best_weights,
            message=f"epoch {epoch}: {config.monitor} {reason.value} to {_fmt(current)} "
            f"(wait {new.wait}/{config.patience})",
        )
    if new.wait >= config.patience and epoch > 0:
        new = replace(new, stopped_epoch=epoch)
        return EarlyStopDecision(
            new,
            Reason.STOP,
            stop=True,
            snapshot_weights=snapshot,
            message=f"epoch {epoch}: stop, {config.monitor}={_fmt(current)} has not improved "
            f"on {_fmt(state.best)} for {new.wait} epochs (patience {config.patience})",
        )
    return EarlyStopDecision(
        new,
        Reason.WAITING,
        snapshot_weights=snapshot,
        message=f"epoch {epoch}: {config.monitor}={_fmt(current)} no better than "
        f"{_fmt(state.best)} (wait {new.wait}/{config.patience})",
    )


# --------------------------------------------------------------------------- plateau
@dataclass(frozen=True)
class PlateauConfig:
    monitor: str = "val_loss"
    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    min_delta: float = 1e-4
    cooldown: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        check_monitor(self.monitor)
        check_mode(self.mode)
        _check_number("factor", self.factor)
        if not 0.0 <= self.factor < 1.0:
            raise ConfigurationError(f"factor must be in [0, 1), got {self.factor!r}")
        _check_number("patience", self.patience, minimum=0, integer=True)
        _check_number("min_delta", self.min_delta)
        _check_number("cooldown", self.cooldown, minimum=0, integer=True)
        _check_number("min_lr", self.min_lr, minimum=0.0)


@dataclass(frozen=True)
class PlateauState:
    wait: int = 0
    best: float | None = None
    cooldown_counter: int = 0

    def to_json(self) -> dict[str, object]:
        return {"wait": self.wait, "best": self.best, "cooldown_counter": self.cooldown_counter}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> PlateauState:
        best = d.get("best")
        return cls(
            wait=int(d.get("wait", 0)),
            best=None if best is None else float(best),
            cooldown_counter=int(d.get("cooldown_counter", 0)),
        )


@dataclass(frozen=True)
class PlateauDecision:
    state: PlateauState
    reason: Reason
    new_lr: float | None = None
    message: str = ""


def plateau_step(
    config: PlateauConfig, state: PlateauState, epoch: int, current: float | None, lr: float
) -> PlateauDecision:
    """One epoch of Keras 3's ``ReduceLROnPlateau.on_epoch_end``."""
    if current is None:
        return PlateauDecision(state, Reason.NOT_MONITORED)
    wait, cooldown = state.wait, state.cooldown_counter
    if cooldown > 0:
        cooldown -= 1
        wait = 0
    if is_improvement(current, state.best, config.mode, config.min_delta):
        return PlateauDecision(
            PlateauState(0, current, cooldown),
            Reason.IMPROVED,
            message=f"epoch {epoch}: {config.monitor} improved to {_fmt(current)}",
        )
    if cooldown > 0:
        return PlateauDecision(PlateauState(wait, state.best, cooldown), Reason.COOLDOWN)
    wait += 1
    if wait < config.patience:
        return PlateauDecision(
            PlateauState(wait, state.best, cooldown),
            Reason.WAITING,
            message=f"epoch {epoch}: plateau wait {wait}/{config.patience}",
        )
    # Keras compares against float32(min_lr): a float32 learning rate that equals min_lr
    # after rounding counts as already at the floor.
    if lr > float(_to_float32(config.min_lr)):
        new_lr = max(lr * config.factor, config.min_lr)
        return PlateauDecision(
            PlateauState(0, state.best, config.cooldown),
            Reason.REDUCE_LR,
            new_lr,
            message=f"epoch {epoch}: {config.monitor} plateaued at {_fmt(state.best)}; "
            f"learning rate {lr:.6g} -> {new_lr:.6g}",
        )
    return PlateauDecision(
        PlateauState(wait, state.best, cooldown),
        Reason.AT_MIN_LR,
        message=f"epoch {epoch}: plateau, learning rate already at min_lr",
    )


def _to_float32(x: float) -> float:
    import struct

    return struct.unpack("f", struct.pack("f", x))[0]


# --------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class SaveDecision:
    save: bool
    best: float | None
    reason: Reason
    message: str = ""


def save_step(
    monitor: str, mode: str, best: float | None, current: float | None, save_best_only: bool
) -> SaveDecision:
    """Keras' ``ModelCheckpoint`` rule: always save, or only on improvement (no
    ``min_delta``). A missing value saves, as Keras does; a NaN never is best."""
    if not save_best_only:
        return SaveDecision(True, best, Reason.SAVE)
    if current is None:
        return SaveDecision(
            True, best, Reason.SAVE, f"{monitor} missing: saving anyway (as Keras does)"
        )
    if is_improvement(current, best, mode):
        return SaveDecision(
            True, current, Reason.SAVE, f"{monitor} improved from {_fmt(best)} to {_fmt(current)}"
        )
    return SaveDecision(
        False, best, Reason.SKIP, f"{monitor}={_fmt(current)} did not improve on {_fmt(best)}"
    )


def _check_count(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}")


@dataclass(frozen=True)
class RetentionDecision:
    """Which committed steps to keep and which to delete, with a reason for each kept one."""

    keep: tuple[int, ...]
    delete: tuple[int, ...]
    reasons: Mapping[int, str]


def decide_retention(
    steps: Sequence[int],
    metrics: Mapping[int, float | None] | None = None,
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    mode: str = "min",
) -> RetentionDecision:
    """Keep the newest ``keep_last`` steps, the ``keep_best`` best by metric, and always
    the newest step. With neither count given, nothing is deleted.

    ``metrics`` maps a step to its monitored value; steps without a finite value are
    never "best" (a NaN is never an improvement). Ties prefer the newer step.
    """
    _check_count("keep_last", keep_last)
    _check_count("keep_best", keep_best)
    if keep_best is not None:
        check_mode(mode)
        if metrics is None:
            raise ConfigurationError("keep_best needs the monitored metric of every step")
    ordered = sorted(set(steps))
    if not ordered:
        return RetentionDecision((), (), {})
    reasons: dict[int, str] = {}
    if keep_last is None and keep_best is None:
        return RetentionDecision(tuple(ordered), (), dict.fromkeys(ordered, "no retention asked"))
    newest = ordered[-1]
    reasons[newest] = "newest"
    if keep_last is not None:
        for s in ordered[-keep_last:]:
            reasons.setdefault(s, f"among the last {keep_last}")
    if keep_best is not None and metrics is not None:
        scored = [(s, v) for s in ordered if (v := metrics.get(s)) is not None and math.isfinite(v)]
        sign = 1.0 if mode == "min" else -1.0
        scored.sort(key=lambda sv: (sign * sv[1], -sv[0]))
        for s, v in scored[:keep_best]:
            reasons.setdefault(s, f"among the best {keep_best} ({v:.6g})")
    keep = tuple(s for s in ordered if s in reasons)
    delete = tuple(s for s in ordered if s not in reasons)
    return RetentionDecision(keep, delete, reasons)
