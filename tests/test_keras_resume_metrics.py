"""Every compiled metric keeps its running totals across a mid-epoch resume into a new
model (a new process builds ``accuracy``'s, ``AUC``'s and ``F1Score``'s variables only
at its first step), so the interrupted epoch's values, and decisions on them, are an
uninterrupted run's."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.preemption import Preempted  # noqa: E402

RNG = np.random.default_rng(4)
X = RNG.normal(size=(160, 6)).astype("float32")  # 10 batches of 16
W = RNG.normal(size=(6, 3))
Y = np.argmax(X @ W + RNG.normal(size=(160, 3)), axis=1)
Y1 = keras.utils.to_categorical(Y, 3)


class Hits(keras.metrics.Metric):
    """A metric of the user's own: correct predictions, summed."""

    def __init__(self, name="hits", **kw):
        super().__init__(name=name, **kw)
        self.hits = self.add_variable(shape=(), initializer="zeros", name="hits")

    def update_state(self, y_true, y_pred, sample_weight=None):
        same = keras.ops.argmax(y_true, axis=-1) == keras.ops.argmax(y_pred, axis=-1)
        self.hits.assign_add(keras.ops.sum(keras.ops.cast(same, "float32")))

    def result(self):
        return self.hits


def make():
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    model.add(keras.layers.Softmax())
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss="categorical_crossentropy",
        metrics=[
            "accuracy",
            keras.metrics.AUC(name="auc"),
            keras.metrics.F1Score(average="macro", name="f1"),
            Hits(),
        ],
    )
    return model


class SignalAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


class Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = {}

    def on_epoch_end(self, epoch, logs=None):
        self.logs[epoch] = {k: float(v) for k, v in logs.items()}


def run(root, model, restored=None, extra=()):
    record = Epochs()
    cbs = fk.production_callbacks(
        str(root),
        monitor="loss",
        communicator=LOCAL,
        verbose=0,
        preemption_check_every_n_batches=1,
        reduce_lr_patience=None,
    )
    fk.fit_resumed(
        model, restored, X, Y1, epochs=4, batch_size=16, verbose=0, callbacks=[*extra, *cbs, record]
    )
    return record.logs


def test_a_mid_epoch_resume_into_a_new_model_keeps_every_metrics_totals(tmp_path, capsys):
    ref = run(tmp_path / "ref", make())
    root = tmp_path / "root"
    with pytest.raises(Preempted):
        run(root, make(), extra=[SignalAt(2, 4)])
    model = make()  # as a new process has it: no compiled metric built yet
    restored = fk.restore_latest(
        model, str(root), communicator=LOCAL, verbose=0, custom_objects={"Hits": Hits}
    )
    assert restored.initial_batch == 5
    resumed = run(root, model, restored)
    assert "metrics differ" not in capsys.readouterr().out
    for key in ("loss", "accuracy", "auc", "f1", "hits"):
        assert resumed[2][key] == ref[2][key], key  # the interrupted epoch, whole
        assert resumed[3][key] == ref[3][key], key


def test_a_metric_that_really_changed_is_named(tmp_path, capsys):
    root = tmp_path / "root"
    with pytest.raises(Preempted):
        run(root, make(), extra=[SignalAt(1, 3)])
    model = make()
    model.compile(
        optimizer=keras.optimizers.Adam(0.02), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    restored = fk.restore_latest(
        model, str(root), communicator=LOCAL, verbose=0, custom_objects={"Hits": Hits}
    )
    run(root, model, restored)
    out = capsys.readouterr().out
    assert "the compiled metrics differ from the checkpoint's" in out
    assert "auc" in out and "cover only the batches after the resume" in out
