"""Keras 3's ``ReduceLROnPlateau.on_epoch_end`` as a pure function."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from forge_dist.errors import ConfigurationError
from forge_dist.policy.core import (
    Reason,
    check_mode,
    check_monitor,
    check_number,
    fmt,
    is_improvement,
)


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
        check_number("factor", self.factor)
        if not 0.0 <= self.factor < 1.0:
            raise ConfigurationError(f"factor must be in [0, 1), got {self.factor!r}")
        check_number("patience", self.patience, minimum=0, integer=True)
        check_number("min_delta", self.min_delta)
        check_number("cooldown", self.cooldown, minimum=0, integer=True)
        check_number("min_lr", self.min_lr, minimum=0.0)


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
            message=f"epoch {epoch + 1}: {config.monitor} improved to {fmt(current)}",
        )
    if cooldown > 0:
        return PlateauDecision(PlateauState(wait, state.best, cooldown), Reason.COOLDOWN)
    wait += 1
    if wait < config.patience:
        return PlateauDecision(
            PlateauState(wait, state.best, cooldown),
            Reason.WAITING,
            message=f"epoch {epoch + 1}: plateau wait {wait}/{config.patience}",
        )
    # Keras compares against float32(min_lr): a float32 learning rate that equals min_lr
    # after rounding counts as already at the floor.
    if lr > float(_to_float32(config.min_lr)):
        new_lr = max(lr * config.factor, config.min_lr)
        return PlateauDecision(
            PlateauState(0, state.best, config.cooldown),
            Reason.REDUCE_LR,
            new_lr,
            message=f"epoch {epoch + 1}: {config.monitor} plateaued at {fmt(state.best)}; "
            f"learning rate {lr:.6g} -> {new_lr:.6g}",
        )
    return PlateauDecision(
        PlateauState(wait, state.best, cooldown),
        Reason.AT_MIN_LR,
        message=f"epoch {epoch + 1}: plateau, learning rate already at min_lr",
    )


def _to_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]
