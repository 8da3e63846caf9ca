"""Retention rule: pure, tested with plain lists."""

from __future__ import annotations

import math

import pytest

from forge_dist.errors import ConfigurationError
from forge_dist.policy import decide_retention


def test_no_counts_keeps_everything():
    d = decide_retention([3, 1, 2])
    assert d.keep == (1, 2, 3) and d.delete == ()


def test_keep_last():
    d = decide_retention([1, 2, 3, 4, 5], keep_last=2)
    assert d.keep == (4, 5) and d.delete == (1, 2, 3)


@pytest.mark.parametrize("mode, best", [("min", 2), ("max", 5)])
def test_keep_best_always_keeps_the_newest(mode, best):
    metrics = {1: 0.5, 2: 0.1, 3: 0.3, 4: 0.4, 5: 0.9, 6: 0.6}
    d = decide_retention(list(metrics), metrics, keep_best=1, mode=mode)
    assert set(d.keep) == {best, 6}
    assert d.reasons[6] == "newest"


def test_nan_is_never_best_and_a_missing_value_is_kept_not_ranked():
    metrics = {1: math.nan, 2: None, 3: 0.7, 4: math.inf, 5: 0.9}
    d = decide_retention([1, 2, 3, 4, 5], metrics, keep_best=1, mode="min", keep_last=1)
    assert d.keep == (2, 3, 5) and d.delete == (1, 4)
    assert "not ranked" in d.reasons[2]


def test_a_protected_step_is_never_deleted():
    metrics = {1: 0.1, 2: 0.2, 3: 0.9, 4: 0.8}
    d = decide_retention([1, 2, 3, 4], metrics, keep_best=1, mode="min", protect=[3])
    assert d.keep == (1, 3, 4) and "protected" in d.reasons[3]


def test_ties_prefer_the_newer_step():
    d = decide_retention([1, 2, 3], {1: 0.5, 2: 0.5, 3: 0.9}, keep_best=1, mode="min")
    assert d.keep == (2, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_last": -1},
        {"keep_last": True},
        {"keep_best": 1, "mode": "auto"},
        {"keep_best": 1, "mode": "min", "no_metrics": True},
    ],
)
def test_bad_configuration_is_an_error(kwargs):
    metrics = None if kwargs.pop("no_metrics", False) else {1: 0.1}
    with pytest.raises(ConfigurationError):
        decide_retention([1], metrics, **kwargs)


# ----------------------------------------------------------------- rank_best
@pytest.mark.parametrize("mode, order", [("min", [2, 4, 1]), ("max", [1, 4, 2])])
def test_rank_best_orders_finite_values_and_prefers_newer_ties(mode, order):
    from forge_dist.policy import rank_best

    values = {1: 0.9, 2: 0.1, 3: math.nan, 4: 0.5, 5: None, 6: math.inf}
    assert rank_best(values, mode) == order  # NaN, None and infinities are never best
    assert rank_best({1: 0.5, 2: 0.5}, mode) == [2, 1]


def test_retention_and_the_stores_best_rank_alike(tmp_path):
    """store.best() and keep_best pick the same step (one ranking, policy.rank_best)."""
    from forge_dist.storage import CheckpointStore

    store = CheckpointStore(str(tmp_path / "r"))
    values = {1: 0.4, 2: 0.2, 3: 0.2, 4: math.nan, 5: 0.9}
    for step, v in values.items():
        with store.writer(step, metrics={"val_loss": v}) as w:
            w.add_bytes("a", b"a")
    best = store.best("val_loss", "min")
    decision = decide_retention(list(values), values, keep_best=1, mode="min")
    assert best.step == 3
    assert set(decision.keep) == {3, 5}  # the best, and always the newest
