"""ChiefModelCheckpoint: saves through the store, loadable by plain Keras."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, X, Y, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import (  # noqa: E402
    StorageError,
)
from forge_dist.storage import CheckpointStore  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_checkpoints_load_with_plain_keras_and_carry_callback_state(tmp_path):
    root = str(tmp_path / "ckpt")
    model = make_model(distributed=True)
    es = fk.SyncEarlyStopping(patience=5, communicator=LOCAL)
    cb = fk.ChiefModelCheckpoint(root, keep_last=2, communicator=LOCAL)
    history = fit(model, [fk.SyncMetrics(communicator=LOCAL), es, cb], epochs=3)
    store = CheckpointStore(root)
    assert store.steps() == [8, 12]  # 4 batches per epoch; the first step was retained out
    info = store.newest(verify="full")
    assert info.state["epoch"] == 2 and info.state["step"] == 12
    assert info.state["callbacks"][es.state_name]["best"] == pytest.approx(es.best)
    # The manifest carries the logs of the epoch it saved.
    assert info.metrics["val_loss"] == pytest.approx(history.history["val_loss"][-1])
    assert info.metrics["loss"] == pytest.approx(history.history["loss"][-1])
    dest = store.download(None, tmp_path / "dl")
    loaded = keras.models.load_model(os.path.join(dest, "model.keras"))
    assert type(loaded.optimizer).__name__ == "Adam"
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_weights_only_and_best_only(tmp_path):
    root = str(tmp_path / "w")
    model = make_model()
    cb = fk.ChiefModelCheckpoint(
        root, save_weights_only=True, save_best_only=True, communicator=LOCAL
    )
    fit(model, [cb], epochs=3)
    store = CheckpointStore(root)
    assert [e.path for e in store.newest().manifest.files] == ["model.weights.h5"]
    fresh = make_model()
    restored = fk.restore_latest(fresh, root, communicator=LOCAL)
    assert restored.restored and restored.initial_epoch == store.newest().state["epoch"] + 1
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Keras 3 weight files carry the optimizer's variables too: they come back.
    iterations = [v for v in fresh.optimizer.variables if "iteration" in v.name]
    assert int(iterations[0].numpy()) == store.newest().state["step"]


def test_an_unusable_root_is_found_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    seen = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(batch)

    cb = fk.ChiefModelCheckpoint(str(blocker), communicator=LOCAL)
    with pytest.raises(StorageError, match="is not a directory"):
        fit(make_model(), [cb, Steps()], epochs=1)
    assert seen == []


def test_a_failed_save_is_an_error_not_a_silent_skip(tmp_path):
    root = tmp_path / "root"

    class Sabotage(keras.callbacks.Callback):
        """After the pre-flight passed: the root becomes a file before the save."""

        def on_epoch_end(self, epoch, logs=None):
            shutil.rmtree(root)
            root.write_text("not a directory")

    cb = fk.ChiefModelCheckpoint(str(root), communicator=LOCAL)
    # (Said by the first thing the save does there: the writer lease's check.)
    with pytest.raises(StorageError, match="(?i)not a directory"):
        fit(make_model(), [Sabotage(), cb], epochs=1)


def test_save_freq_in_batches(tmp_path):
    root = str(tmp_path / "b")
    model = make_model()
    cb = fk.ChiefModelCheckpoint(root, save_freq=3, communicator=LOCAL)
    fit(model, [cb], epochs=2)  # 4 batches per epoch: saves after batches 3 and 6
    store = CheckpointStore(root)
    assert store.steps() == [3, 6]
    assert store.get(3).state["epoch_done"] is False and store.get(3).state["epoch"] == 0
    assert store.get(6).state["epoch"] == 1


def test_retention_through_the_callback_keeps_steps_saved_without_validation(tmp_path):
    root = str(tmp_path / "r")
    cb = fk.ChiefModelCheckpoint(root, keep_last=1, keep_best=1, communicator=LOCAL)
    history = make_model().fit(
        X,
        Y,
        validation_data=(X[:32], Y[:32]),
        validation_freq=2,  # epochs 1, 3, 5 (counted from 1) have no val_loss
        epochs=6,
        batch_size=32,  # 4 steps an epoch
        shuffle=False,
        verbose=0,
        callbacks=[cb],
    )
    validated = dict(zip([8, 16, 24], history.history["val_loss"], strict=True))
    best = min(validated, key=lambda s: (validated[s], -s))
    store = CheckpointStore(root)
    infos = {c.step: c for c in store.list()}
    assert sorted(infos) == sorted({4, 12, 20, 24, best}), "newest, best, and the unranked"
    assert [s for s, c in infos.items() if "val_loss" not in c.metrics] == [4, 12, 20]
    assert not (set(validated) - {best, 24}) & set(infos), "ranked steps beyond keep_best go"
    assert len(infos) < 6


def test_a_checkpoint_driven_by_another_callback_saves_alone(tmp_path):
    """A wrapper that calls a ChiefModelCheckpoint's hooks itself (it is not in the fit's
    list, as in benchmarks/bench_save.py) gets each epoch's save, not an IndexError."""
    from forge_dist.storage import CheckpointStore

    inner = fk.ChiefModelCheckpoint(str(tmp_path / "r"), communicator=LOCAL)

    class Wrapper(keras.callbacks.Callback):
        def set_model(self, model):
            super().set_model(model)
            inner.set_model(model)

        def on_train_begin(self, logs=None):
            inner.on_train_begin(logs)

        def on_epoch_end(self, epoch, logs=None):
            inner.on_epoch_end(epoch, logs)

    fit(make_model(), [Wrapper()], epochs=2)
    assert CheckpointStore(str(tmp_path / "r")).steps() == [4, 8]
