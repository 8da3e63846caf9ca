"""The pure policy decides exactly as Keras' own callbacks do (Keras 3 and tf_keras),
checked on random metric sequences; and NaN is never an improvement."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forge_dist import policy
from forge_dist.errors import ConfigurationError

pytestmark = pytest.mark.keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _Opt:
    def __init__(self, lr):
        self.learning_rate = lr
        self.lr = lr


class _Model:
    def __init__(self, lr=0.1):
        self.stop_training = False
        self.optimizer = _Opt(lr)
        self.epoch_weights = None

    def get_weights(self):
        return [self.epoch_weights]

    def set_weights(self, w):
        self.epoch_weights = w[0]


def keras_flavors():
    out = []
    try:
        import keras

        out.append(("keras3", keras))
    except ImportError:  # pragma: no cover
        pass
    try:
        import tf_keras

        out.append(("tf_keras", tf_keras))
    except ImportError:  # pragma: no cover
        pass
    if not out:
        pytest.skip("no Keras installed (the [tf] extra)")
    return out


# Values on a binary grid: Keras 3 compares in float32 and tf_keras in float64, and the
# policy (float64) must agree with both; off-grid values would only probe float32 rounding.
values = st.lists(st.integers(-320, 320).map(lambda i: i / 64), min_size=1, max_size=14)


def run_keras_early_stopping(k, seq, **kw):
    cb = k.callbacks.EarlyStopping(**kw)
    model = _Model()
    cb.set_model(model)
    cb.on_train_begin()
    stops = None
    for epoch, v in enumerate(seq):
        model.epoch_weights = epoch
        cb.on_epoch_end(epoch, {"val_loss": v, "val_acc": v})
        if model.stop_training:
            stops = epoch
            break
    cb.on_train_end()
    return stops, cb.wait, model.epoch_weights


def run_policy_early_stopping(seq, monitor, mode, **kw):
    config = policy.EarlyStopConfig(monitor=monitor, mode=mode, **kw)
    state = policy.EarlyStopState()
    best_weights = None
    weights = None
    d = None
    for epoch, v in enumerate(seq):
        weights = epoch
        d = policy.early_stop_step(config, state, epoch, v)
        state = d.state
        if d.snapshot_weights:
            best_weights = epoch
        if d.stop:
            break
    final = best_weights if config.restore_best_weights and best_weights is not None else weights
    return (state.stopped_epoch if d.stop else None), state.wait, final


@settings(max_examples=150, deadline=None)
@given(
    seq=values,
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.25, 0.5]),
    baseline=st.sampled_from([None, 0.0, 2.0]),
    start=st.integers(0, 3),
    restore=st.booleans(),
    mode=st.sampled_from(["min", "max"]),
)
def test_early_stopping_decides_like_keras(
    seq, patience, min_delta, baseline, start, restore, mode
):
    for _, k in keras_flavors():
        kw = dict(
            patience=patience,
            min_delta=min_delta,
            baseline=baseline,
            start_from_epoch=start,
            restore_best_weights=restore,
        )
        expected = run_keras_early_stopping(k, seq, monitor="val_loss", mode=mode, **kw)
        got = run_policy_early_stopping(seq, "val_loss", mode, **kw)
        assert got == expected


def run_keras_plateau(k, seq, lr, **kw):
    cb = k.callbacks.ReduceLROnPlateau(**kw)
    model = _Model(lr)
    if k.__name__ != "keras":
        import tensorflow as tf

        model.optimizer.lr = tf.Variable(lr, dtype=tf.float64)  # tf_keras uses set_value
    cb.set_model(model)
    cb.on_train_begin()
    lrs = []
    for epoch, v in enumerate(seq):
        cb.on_epoch_end(epoch, {"val_loss": v})
        lrs.append(
            float(
                model.optimizer.learning_rate
                if k.__name__ == "keras"
                else k.backend.get_value(model.optimizer.lr)
            )
        )
    return lrs


def run_policy_plateau(seq, lr, **kw):
    config = policy.PlateauConfig(monitor="val_loss", **kw)
    state = policy.PlateauState()
    lrs = []
    for epoch, v in enumerate(seq):
        d = policy.plateau_step(config, state, epoch, v, lr)
        state = d.state
        if d.new_lr is not None:
            lr = d.new_lr
        lrs.append(lr)
    return lrs


@settings(max_examples=150, deadline=None)
@given(
    seq=values,
    patience=st.integers(0, 3),
    cooldown=st.integers(0, 2),
    factor=st.sampled_from([0.1, 0.5]),
    min_delta=st.sampled_from([0.0, 0.25, 0.5]),
    min_lr=st.sampled_from([0.0, 0.004]),
    mode=st.sampled_from(["min", "max"]),
)
def test_plateau_decides_like_keras(seq, patience, cooldown, factor, min_delta, min_lr, mode):
    kw = dict(
        patience=patience,
        cooldown=cooldown,
        factor=factor,
        min_delta=min_delta,
        min_lr=min_lr,
        mode=mode,
    )
    for _, k in keras_flavors():
        expected = run_keras_plateau(k, seq, 0.1, **kw)
        got = run_policy_plateau(seq, 0.1, **kw)
        assert got == pytest.approx(expected, rel=1e-6)


def test_nan_is_never_an_improvement():
    config = policy.EarlyStopConfig(patience=1)
    d = policy.early_stop_step(config, policy.EarlyStopState(), 0, math.nan)
    assert d.state.best is None and d.reason is policy.Reason.WAITING
    d = policy.early_stop_step(config, d.state, 1, math.nan)
    assert d.stop
    assert not policy.is_improvement(math.nan, None, "min")
    assert policy.is_improvement(1.0, math.nan, "min")
    p = policy.plateau_step(
        policy.PlateauConfig(patience=1), policy.PlateauState(), 0, math.nan, 0.1
    )
    assert p.new_lr == pytest.approx(0.01)


@pytest.mark.parametrize(
    "monitor, mode, direction, expected",
    [
        ("val_loss", "auto", None, "min"),
        ("loss", "auto", None, "min"),
        ("val_accuracy", "auto", None, "max"),
        ("val_auc", "auto", None, "max"),
        ("val_custom", "auto", "up", "max"),
        ("val_custom", "auto", "down", "min"),
        ("val_custom", "max", None, "max"),
    ],
)
def test_mode_auto_rules(monitor, mode, direction, expected):
    assert policy.resolve_mode(monitor, mode, direction) == expected


def test_mode_auto_refuses_to_guess():
    with pytest.raises(ConfigurationError, match="mode='min' or mode='max'"):
        policy.resolve_mode("val_custom", "auto")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patience": -1},
        {"patience": 1.5},
        {"min_delta": float("nan")},
        {"start_from_epoch": -2},
        {"baseline": "high"},
        {"monitor": ""},
        {"mode": "auto"},
    ],
)
def test_early_stop_config_is_validated(kwargs):
    with pytest.raises(ConfigurationError):
        policy.EarlyStopConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"factor": 1.0}, {"factor": -0.1}, {"cooldown": -1}, {"min_lr": -1.0}, {"patience": None}],
)
def test_plateau_config_is_validated(kwargs):
    with pytest.raises(ConfigurationError):
        policy.PlateauConfig(**kwargs)


def test_save_best_only_rule():
    d = policy.save_step("val_loss", "min", None, 0.5, True)
    assert d.save and d.best == 0.5
    d = policy.save_step("val_loss", "min", 0.5, 0.6, True)
    assert not d.save and d.best == 0.5
    assert policy.save_step("val_loss", "min", 0.5, math.nan, True).save is False
    assert policy.save_step("val_loss", "min", 0.5, None, True).save is True
    assert policy.save_step("val_loss", "min", 0.5, 9.0, False).save is True
