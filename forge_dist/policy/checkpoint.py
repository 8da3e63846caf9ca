"""What to save and what to keep: Keras' ``ModelCheckpoint`` rule, and retention.

:func:`rank_best` is the one ranking of steps by a monitored value; the store's
``best()`` and retention both use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from forge_dist.errors import ConfigurationError
from forge_dist.policy.core import Reason, check_count, check_mode, fmt, is_improvement


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
            True, current, Reason.SAVE, f"{monitor} improved from {fmt(best)} to {fmt(current)}"
        )
    return SaveDecision(
        False, best, Reason.SKIP, f"{monitor}={fmt(current)} did not improve on {fmt(best)}"
    )


def rank_best(values: Mapping[int, float | None], mode: str) -> list[int]:
    """Steps ordered best first by their value; steps without a finite value are left
    out (a NaN is never best); ties prefer the newer step."""
    check_mode(mode)
    sign = 1.0 if mode == "min" else -1.0
    scored = [(s, v) for s, v in values.items() if v is not None and math.isfinite(v)]
    scored.sort(key=lambda sv: (sign * sv[1], -sv[0]))
    return [s for s, _ in scored]


@dataclass(frozen=True)
class Retention:
    """What to keep: the newest ``keep_last`` steps and the ``keep_best`` best by
    ``monitor`` (``mode`` "min" or "max"); neither count: keep everything. One value
    from where it is chosen (a callback's arguments, ``forge-dist gc``'s flags) to where
    it is applied."""

    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        check_count("keep_last", self.keep_last)
        check_count("keep_best", self.keep_best)
        check_mode(self.mode)
        if self.keep_best is not None and not self.monitor:
            raise ConfigurationError("keep_best needs monitor= (the metric to rank steps by)")

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_best is not None

    @property
    def most_kept(self) -> int:
        """How many steps it keeps at most (beyond the newest it always keeps)."""
        return max((self.keep_last or 0) + (self.keep_best or 0), 1)

    def decide(
        self,
        steps: Sequence[int],
        metrics: Mapping[int, float | None] | None,
        protect: Sequence[int] = (),
        superseded: Sequence[int] = (),
    ) -> RetentionDecision:
        return decide_retention(
            steps,
            metrics,
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            mode=self.mode,
            protect=protect,
            superseded=superseded,
        )

    def __str__(self) -> str:
        parts = [f"keep_last={self.keep_last}", f"keep_best={self.keep_best}"]
        if self.keep_best is not None:
            parts.append(f"monitor={self.monitor!r} ({self.mode})")
        return ", ".join(parts)


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
    protect: Sequence[int] = (),
    superseded: Sequence[int] = (),
) -> RetentionDecision:
    """Keep the newest ``keep_last`` steps, the ``keep_best`` best by metric, always the
    newest step and every step in ``protect`` (e.g. the one just committed). With
    neither count given, nothing is deleted.

    ``metrics`` maps a step to its monitored value; a NaN is never "best" (it may be
    deleted), but a step with no value at all (None: the metric was not logged there)
    is kept, not ranked, unless it is ``superseded`` (taken mid-epoch, with a later
    epoch's end committed: it has no validation value and never will). Ties prefer the
    newer step.
    """
    check_count("keep_last", keep_last)
    check_count("keep_best", keep_best)
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
    for s in protect:
        if s in ordered:
            reasons.setdefault(s, "protected (just committed)")
    if keep_last is not None:
        for s in ordered[-keep_last:]:
            reasons.setdefault(s, f"among the last {keep_last}")
    if keep_best is not None and metrics is not None:
        ranked = rank_best({s: metrics.get(s) for s in ordered}, mode)
        for s in ranked[:keep_best]:
            reasons.setdefault(s, f"among the best {keep_best} ({metrics[s]:.6g})")
        for s in ordered:
            if metrics.get(s) is None and s not in superseded:
                reasons.setdefault(s, "no value of the monitored metric: kept, not ranked")
    keep = tuple(s for s in ordered if s in reasons)
    delete = tuple(s for s in ordered if s not in reasons)
    return RetentionDecision(keep, delete, reasons)
