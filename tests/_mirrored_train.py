"""MirroredStrategy over two logical CPU devices in one process, with the production
stack. Prints one JSON line with what the test checks."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from forge_dist.keras import _compat  # noqa: E402

keras = _compat.keras
root = sys.argv[1]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = np.tanh(x @ np.linspace(-1, 1, 8).astype("float32")[:, None])
with strategy.scope():
    from forge_dist import get_communicator
    from forge_dist import keras as fk

    comm = get_communicator("auto")
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    restored = fk.restore_latest(model, root)
    callbacks = fk.production_callbacks(root, patience=2, keep_last=2, verbose=0)
history = model.fit(
    x,
    y,
    validation_data=(x[:64], y[:64]),
    epochs=3,
    batch_size=32,
    shuffle=False,
    verbose=0,
    callbacks=callbacks,
    initial_epoch=restored.initial_epoch,
)
print(
    json.dumps(
        {
            "backend": comm.backend,
            "replicas": strategy.num_replicas_in_sync,
            "flavor": _compat.FLAVOR,
            "epochs": len(history.history.get("loss", [])),
            "initial_epoch": restored.initial_epoch,
            "fingerprint": _compat.weights_fingerprint(model.get_weights()),
        }
    )
)
