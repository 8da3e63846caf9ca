"""The callback-state protocol: each callback's state stored under its registered name
and handed back to it, and only to it, by restore_latest."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.keras.callbacks import ForgeCallback  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402


class Score(keras.callbacks.Callback):
    """A monitored value that is best at epoch 1 (of 4), whatever the training does."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_score"] = [3.0, 1.0, 2.0, 4.0][epoch]


def best_weights_stack(root):
    es = fk.SyncEarlyStopping(
        monitor="val_score", mode="min", patience=9, restore_best_weights=True, communicator=LOCAL
    )
    return es, [Score(), es, fk.ChiefModelCheckpoint(root, communicator=LOCAL)]


class Counter(ForgeCallback):
    """A user's own stateful callback, written against the public protocol."""

    state_key = "counter"

    def __init__(self) -> None:
        super().__init__(communicator=LOCAL)
        self.epochs = 0

    def get_state(self):
        return {"epochs": self.epochs}

    def set_state(self, state, weights=None):
        self.epochs = state["epochs"]

    def reset_state(self):
        self.epochs = 0

    def on_train_begin(self, logs=None):
        self.begin_state()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1


def test_each_callback_gets_its_own_state_back_under_its_registered_name(tmp_path):
    root = str(tmp_path / "r")
    model = make_model()
    first = fk.SyncEarlyStopping(monitor="val_loss", patience=9, communicator=LOCAL)
    second = fk.SyncEarlyStopping(monitor="loss", patience=9, communicator=LOCAL)
    counter = Counter()
    fit(model, [first, second, counter, fk.ChiefModelCheckpoint(root, communicator=LOCAL)])
    # Named by kind and monitor (two alike would be told apart by #2).
    assert (first.state_name, second.state_name) == (
        "early_stopping[val_loss]",
        "early_stopping[loss]",
    )
    saved = CheckpointStore(root).newest().state["callbacks"]
    assert saved["early_stopping[val_loss]"]["best"] == first.best
    assert saved["early_stopping[loss]"]["best"] == second.best != first.best
    assert saved["counter"] == {"epochs": 3}

    fresh = make_model()
    restored = fk.restore_latest(fresh, root, communicator=LOCAL)
    again = [
        fk.SyncEarlyStopping(monitor="val_loss", patience=9, communicator=LOCAL),
        fk.SyncEarlyStopping(monitor="loss", patience=9, communicator=LOCAL),
        Counter(),
    ]
    # Nothing left to train: on_train_begin alone takes the state back.
    fit(fresh, again, epochs=restored.initial_epoch, initial_epoch=restored.initial_epoch)
    assert again[0].best == first.best and again[1].best == second.best
    assert again[2].epochs == 3


def test_a_state_that_asks_for_an_earlier_epochs_weights_gets_them(tmp_path):
    root = str(tmp_path / "r")
    es, stack = best_weights_stack(root)
    fit(make_model(), stack, epochs=4)
    store = CheckpointStore(root)
    assert store.newest().state["callbacks"]["early_stopping[val_score]"]["weights_of_epoch"] == 1
    at_best = next(c for c in store.list() if c.state["epoch"] == 1)
    dest = store.download(at_best.step, tmp_path / "best")
    expected = keras.models.load_model(os.path.join(dest, "model.keras")).get_weights()

    fresh = make_model()
    fk.restore_latest(fresh, root, communicator=LOCAL)
    again, _ = best_weights_stack(root)
    again.set_model(fresh)
    again.on_train_begin()
    assert again.state.has_best_weights and again.best_epoch == 1 and again.best == 1.0
    for a, b in zip(again.best_weights, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_a_checkpoint_of_that_epoch_the_state_does_without(tmp_path):
    root = str(tmp_path / "r")
    _, stack = best_weights_stack(root)
    fit(make_model(), stack, epochs=4)
    store = CheckpointStore(root)
    store.delete(next(c.step for c in store.list() if c.state["epoch"] == 1))
    fresh = make_model()
    fk.restore_latest(fresh, root, communicator=LOCAL)
    again, _ = best_weights_stack(root)
    again.set_model(fresh)
    again.on_train_begin()
    assert again.best == 1.0 and not again.state.has_best_weights
    assert again.best_weights is None


def test_a_checkpoint_from_before_names_carried_settings_still_gives_state_back():
    from forge_dist.keras._state import Restored, set_pending

    model = make_model()
    es = fk.SyncEarlyStopping(monitor="val_loss", patience=9, communicator=LOCAL)
    es.set_model(model)
    old = {"mode": "min", "wait": 2, "best": 0.25, "best_epoch": 1, "stopped_epoch": 0}
    set_pending(model, {"early_stopping": Restored(old)}, epoch=2)
    es.on_train_begin()
    assert (es.state_name, es.wait, es.best) == ("early_stopping[val_loss]", 2, 0.25)
