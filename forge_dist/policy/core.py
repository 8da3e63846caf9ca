"""What every rule shares: directions (``mode``), argument checks, the improvement test
and the reasons a decision gives."""

from __future__ import annotations

import enum
import math

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


def check_number(
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


def fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.6g}"


def check_count(name: str, value: int | None) -> None:
    """``value`` is a positive integer or None (e.g. ``keep_last``)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}")
