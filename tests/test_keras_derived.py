"""DerivedMetric: a monitor computed from the synced logs, identical on every rank, that
early stopping, plateau and checkpoint can use with mode="auto"."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402
from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402


def best_of(logs):
    return max(logs["val_a"], logs["val_b"])


def test_computed_from_the_synced_values_the_same_on_every_rank():
    def rank_fn(comm):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        sync = fk.SyncMetrics(communicator=comm)
        derived = fk.DerivedMetric("val_best", best_of, mode="max", communicator=comm)
        for cb in (sync, derived):
            cb.set_model(model)
        logs = {"val_a": [0.2, 0.6][comm.rank], "val_b": [0.5, 0.1][comm.rank]}
        sync.on_epoch_end(0, logs)
        derived.on_epoch_end(0, logs)
        return logs["val_best"]

    # Means first (a: 0.4, b: 0.3), then the max: 0.4 on both; not each rank's own 0.5/0.6.
    assert run_ranks(2, rank_fn) == [pytest.approx(0.4), pytest.approx(0.4)]


class Scores(keras.callbacks.Callback):
    """Two validation scores: neither beats the best of both after epoch 2."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_a"] = [0.5, 0.7, 0.6, 0.65, 0.69, 0.6][epoch]
        logs["val_b"] = [0.4, 0.5, 0.68, 0.6, 0.66, 0.6][epoch]


def test_early_stopping_plateau_and_checkpoint_use_it_with_mode_auto(tmp_path):
    root = str(tmp_path / "r")
    derived = fk.DerivedMetric("val_best", best_of, mode="max", communicator=LOCAL)
    es = fk.SyncEarlyStopping(monitor="val_best", patience=2, communicator=LOCAL)
    lr = fk.SyncReduceLROnPlateau(monitor="val_best", patience=1, factor=0.5, communicator=LOCAL)
    ckpt = fk.ChiefModelCheckpoint(
        root, monitor="val_best", save_best_only=True, communicator=LOCAL
    )
    fit(make_model(), [Scores(), derived, lr, es, ckpt], epochs=6)
    assert es.best == 0.7 and es.best_epoch == 1
    assert es.stopped_epoch == 3  # epochs 3 and 4 (0.68, 0.69) do not beat 0.7
    assert es.config.mode == lr.config.mode == "max"
    assert [c.metrics["val_best"] for c in CheckpointStore(root).list()] == [0.5, 0.7]


def test_a_failing_formula_is_one_clear_error():
    derived = fk.DerivedMetric(
        "val_x", lambda logs: logs["val_missing"], mode="min", communicator=LOCAL
    )
    with pytest.raises(ConfigurationError, match=r"DerivedMetric\('val_x'\) failed at epoch 1"):
        fit(make_model(), [derived], epochs=1)
    with pytest.raises(ConfigurationError, match="mode must be"):
        fk.DerivedMetric("val_x", best_of, mode="auto", communicator=LOCAL)
