"""policy.metrics: the means every rank agrees on."""

from __future__ import annotations

import pytest

from forge_dist.policy import mean_over_ranks


def test_plain_and_weighted_column_means():
    plain, weighted = mean_over_ranks([[1.0, 1.0], [3.0, 2.0]], [10, 30])
    assert plain == [2.0, 1.5]
    assert weighted == pytest.approx([(10 * 1 + 30 * 3) / 40, (10 * 1 + 30 * 2) / 40])


@pytest.mark.parametrize("weights", [None, [10, None], [0, 0]])
def test_without_usable_weights_the_weighted_mean_is_the_plain_one(weights):
    plain, weighted = mean_over_ranks([[1.0], [2.0]], weights)
    assert plain == weighted == [1.5]


def test_every_rank_gets_bit_identical_results_from_the_same_rows():
    rows = [[0.1, 1e-17], [0.2, 1.0], [0.3, -1.0]]
    assert mean_over_ranks(rows, [1, 2, 3]) == mean_over_ranks([list(r) for r in rows], [1, 2, 3])


def test_no_ranks_no_values():
    assert mean_over_ranks([], None) == ([], [])
