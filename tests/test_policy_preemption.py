"""policy.preemption: how often the ranks look for a preemption signal."""

from __future__ import annotations

import pytest

from forge_dist.policy import check_spacing


@pytest.mark.parametrize(
    "step_s, check_s, expected",
    [
        (0.004, 0.0004, 10),  # 4 ms steps, 0.4 ms checks: every 10th batch is 1 %
        (2.0, 0.0004, 1),  # 2 s steps: a check costs nothing, check every batch
        (0.5, 1.0, 20),  # 0.5 s steps, 1 s checks: still acted on within 10 s
        (20.0, 5.0, 1),  # a batch longer than 10 s: every batch
    ],
)
def test_checks_are_cheap_but_prompt(step_s, check_s, expected):
    assert check_spacing(step_s, check_s) == expected


def test_a_zero_step_time_does_not_divide_by_zero():
    assert check_spacing(0.0, 0.001) >= 1
