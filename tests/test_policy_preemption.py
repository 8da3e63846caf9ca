"""policy.preemption: how often the ranks look for a preemption signal."""

from __future__ import annotations

import pytest

from forge_dist.policy import check_spacing, notice_shortfall
from forge_dist.policy.preemption import p95


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


def test_p95_is_the_nearest_rank():
    assert p95([3.0]) == 3.0
    assert p95([float(i) for i in range(1, 21)]) == 19.0  # 20 values: the 19th
    assert p95([float(i) for i in range(100, 0, -1)]) == 95.0  # order does not matter
    assert p95([1.0, 9.0, 2.0]) == 9.0  # fewer than 20: the largest


def test_a_notice_that_fits_noticing_and_a_save_says_nothing():
    # Checks every 5 batches of 0.2 s (1 s) + a 10 s save at p95 = 11 s <= 12 s.
    assert notice_shortfall(12.0, [4.0, 10.0, 6.0], every=5, step_s=0.2) is None
    assert notice_shortfall(1.0, [], every=1, step_s=0.1) is None  # nothing measured yet


def test_a_notice_too_short_names_every_number():
    said = notice_shortfall(10.0, [4.0, 10.0, 6.0], every=5, step_s=0.2)
    assert said is not None
    for part in (
        "notice of 10 s",
        "up to 1.0 s (a check every 5 batch(es) of 200 ms)",
        "a save 10.0 s (the p95 of 3 save(s) measured)",
        "11.0 s in all",
        "--signal=B:USR1@N",
        "FORGE_DIST_PREEMPT_NOTICE_S",
    ):
        assert part in said, (part, said)
    # The step time is not known yet (a resumed job before its first batch): saves only.
    assert "9.0 s in all" in notice_shortfall(8.0, [9.0], every=3, step_s=None)
