"""Keras 3's ``EarlyStopping.on_epoch_end`` as a pure function."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from forge_dist.policy.core import (
    Reason,
    check_mode,
    check_monitor,
    check_number,
    fmt,
    is_improvement,
)


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
        check_number("min_delta", self.min_delta)
        check_number("patience", self.patience, minimum=0, integer=True)
        check_number("start_from_epoch", self.start_from_epoch, minimum=0, integer=True)
        if self.baseline is not None:
            check_number("baseline", self.baseline)


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
            message=f"epoch {epoch + 1}: {config.monitor} not monitored yet",
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
            message=f"epoch {epoch + 1}: {config.monitor} {reason.value} to {fmt(current)} "
            f"(wait {new.wait}/{config.patience})",
        )
    if new.wait >= config.patience and epoch > 0:
        new = replace(new, stopped_epoch=epoch)
        return EarlyStopDecision(
            new,
            Reason.STOP,
            stop=True,
            snapshot_weights=snapshot,
            message=f"epoch {epoch + 1}: stop, {config.monitor}={fmt(current)} has not improved "
            f"on {fmt(state.best)} for {new.wait} epochs (patience {config.patience})",
        )
    return EarlyStopDecision(
        new,
        Reason.WAITING,
        snapshot_weights=snapshot,
        message=f"epoch {epoch + 1}: {config.monitor}={fmt(current)} no better than "
        f"{fmt(state.best)} (wait {new.wait}/{config.patience})",
    )
