"""A tiny Keras model and fit shared by the one-process Keras tests (Keras 3)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.comm import LocalCommunicator  # noqa: E402

LOCAL = LocalCommunicator()
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(128, 4)).astype("float32")
Y = (X @ np.array([[1.0], [-1.0], [0.5], [0.0]], dtype="float32")).astype("float32")


def make_model(lr: float = 0.05, distributed: bool = False, units: int = 4, seed: int = 3) -> Any:
    """Dense(units, tanh) -> Dense(1), Adam, mse + mae; seeded."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(units, activation="tanh"), keras.layers.Dense(1)]
    )
    opt = keras.optimizers.Adam(lr)
    if distributed:
        opt = fk.DistributedOptimizer(opt, communicator=LOCAL)
    model.compile(optimizer=opt, loss="mse", metrics=["mae"])
    return model


def fit(
    model: Any, callbacks: list, epochs: int = 3, initial_epoch: int = 0, batch_size: int = 32
) -> Any:
    """``model.fit`` on X, Y with the first 32 samples as validation data, unshuffled."""
    return model.fit(
        X,
        Y,
        validation_data=(X[:32], Y[:32]),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        initial_epoch=initial_epoch,
    )


class Steps(keras.callbacks.Callback):
    """Counts the training batches that began (0: stopped before the first step)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.batches += 1
