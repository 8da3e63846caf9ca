"""Pure decisions: no TensorFlow, no I/O. Unit-tested with plain lists.

This module holds the retention rule used by the store and ``forge-dist gc``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from forge_dist.errors import ConfigurationError

MODES = ("min", "max")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


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
