"""How often the ranks should agree whether a preemption signal came."""

from __future__ import annotations

import math

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
