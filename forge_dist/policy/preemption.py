"""How often the ranks should agree whether a preemption signal came, and whether the
notice a preemption gives fits a save."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: A check should cost about this share of the training step time ...
CHECK_BUDGET = 0.01
#: ... while a signal is still acted on within about this many seconds.
ACT_WITHIN_S = 10.0


def check_spacing(step_s: float, check_s: float) -> int:
    """Batches between two preemption checks, from the mean step time and the mean
    time of one check (seconds): cheap (about 1 % of the step time) but prompt (within
    about 10 s, or at the next batch when a batch takes longer)."""
    step = max(step_s, 1e-9)
    cheap = math.ceil(check_s / (CHECK_BUDGET * step))
    prompt = max(1, int(ACT_WITHIN_S / step))
    return max(1, min(cheap, prompt))


def p95(values: Sequence[float]) -> float:
    """The 95th percentile by nearest rank (the largest of fewer than 20 values)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def notice_shortfall(
    notice_s: float, save_s: Sequence[float], every: int, step_s: float | None
) -> str | None:
    """What is wrong when a preemption notice of ``notice_s`` seconds (SLURM's
    ``--signal=USR1@N``) cannot fit what acting on it takes: noticing the signal (a check
    every ``every`` batches of ``step_s`` seconds) plus one save at the p95 of the
    ``save_s`` measured. None when it fits, or when no save was measured yet."""
    if not save_s:
        return None
    save = p95(save_s)
    notice = every * (step_s or 0.0)
    if notice + save <= notice_s:
        return None
    return (
        f"a preemption notice of {notice_s:g} s cannot fit the save it asks for: noticing "
        f"the signal takes up to {_s(notice)} (a check every {every} batch(es) of "
        f"{_s(step_s or 0.0)}) and a save {_s(save)} (the p95 of {len(save_s)} save(s) "
        f"measured), {_s(notice + save)} in all. Ask for a longer notice "
        "(#SBATCH --signal=B:USR1@N with FORGE_DIST_PREEMPT_NOTICE_S=N), or make saves "
        "smaller or faster, or the job may be killed before its checkpoint is committed"
    )


def _s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"
