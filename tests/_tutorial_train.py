"""The tutorial's training script with its callback list ported to forge_dist by
swapping ``keras.callbacks.X`` for ``forge_dist.keras.X`` (run under ``mpirun -np 2``).

A softmax classifier with ``metrics=["accuracy"]``; each rank trains on its own shard
and validates on its own shard (rank 1's is noisier, so the ranks' own values differ).
The list keeps the tutorial's order: backup, checkpoint, early stopping, plateau,
TensorBoard, CSV, the tutorial's alert. Two recorders bracket it: ``Raw`` (first: this
rank's own values) and ``Seen`` (last: what the list left, the learning rate, a
fingerprint of the weights). ``--crash-after-commit N``: the chief SIGKILLs itself right
after the N-th backup commit (the storage layer's named point), as a node dies.
Reports go to ``<out>/rank-<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ap = argparse.ArgumentParser()
ap.add_argument("--work", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--epochs", type=int, default=8)
ap.add_argument("--crash-after-commit", type=int, default=None)
ap.add_argument("--backend", default="mpi", choices=["mpi", "auto"])
args = ap.parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras = tf.keras  # Keras 3, or tf_keras with TF_USE_LEGACY_KERAS=1

from forge_dist import get_communicator  # noqa: E402
from forge_dist import keras as fk  # noqa: E402
from forge_dist.keras._compat import weights_fingerprint  # noqa: E402
from forge_dist.storage import _faults  # noqa: E402

comm = get_communicator(args.backend)
rank = comm.rank
work = os.path.abspath(args.work)
touched: list[str] = []


def audit(event: str, eargs: tuple) -> None:
    """What this rank writes or removes under the work folder."""
    writes = (
        event == "open"
        and len(eargs) > 1
        and isinstance(eargs[1], str)
        and (set(eargs[1]) & set("wax+"))
    )
    if writes or event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir"):
        p = eargs[0]
        if isinstance(p, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(p))
            if full.startswith(work + os.sep) or full == work:
                touched.append(f"{event} {full}")


sys.addaudithook(audit)

# The task: 3 classes from 8 features; every rank its own training and validation shard.
rng = np.random.default_rng(100 + rank)
W = np.random.default_rng(7).normal(size=(8, 3))
x = rng.normal(size=(256, 8)).astype("float32")
y = np.argmax(x @ W, axis=1)
xv = rng.normal(size=(96, 8)).astype("float32")
yv = np.argmax(xv @ W + (1.5 * rng.normal(size=(96, 3)) if rank == 1 else 0.0), axis=1)

keras.utils.set_random_seed(42)  # the tutorial's seed: the same initial weights everywhere
model = keras.Sequential(
    [
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
    ]
)
model.compile(
    optimizer=fk.DistributedOptimizer(keras.optimizers.Adam(0.01)),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)


class Raw(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})


class Seen(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs, self.weights = [], []

    def on_epoch_end(self, epoch, logs=None):
        lr = float(np.asarray(self.model.optimizer.learning_rate))
        self.logs.append({"epoch": epoch, "lr": lr, **{k: float(v) for k, v in logs.items()}})
        self.weights.append(weights_fingerprint(self.model.get_weights()))


class AlertCallback(keras.callbacks.Callback):
    """The tutorial's alert: say so once val_accuracy passes a threshold."""

    def on_epoch_end(self, epoch, logs=None):
        if logs["val_accuracy"] > 0.5:
            print(f"ALERT epoch {epoch + 1}: val_accuracy {logs['val_accuracy']:.4f}", flush=True)


if args.crash_after_commit and rank == 0:
    commits = []

    def crash(point: str) -> None:
        if point == "committed":
            commits.append(point)
            if len(commits) == args.crash_after_commit:
                os.kill(os.getpid(), signal.SIGKILL)

    _faults.hook = crash

raw, seen = Raw(), Seen()
callbacks = [
    raw,
    fk.BackupAndRestore(backup_dir=os.path.join(work, "backup")),
    fk.ChiefModelCheckpoint(
        filepath=os.path.join(work, "models", "best_model.keras"),
        monitor="val_accuracy",
        save_best_only=True,
        verbose=1,
    ),
    fk.SyncEarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True, verbose=1),
    fk.SyncReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1, verbose=1),
    fk.ChiefTensorBoard(log_dir=os.path.join(work, "logs")),
    fk.ChiefCSVLogger(os.path.join(work, "training_log.csv")),
    AlertCallback(),
    seen,
]
history = model.fit(
    x,
    y,
    validation_data=(xv, yv),
    epochs=args.epochs,
    batch_size=32,
    shuffle=False,
    verbose=2,  # Keras' epoch lines: the chief's only
    callbacks=callbacks,
)
stopper = callbacks[3]
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, f"rank-{rank}.json"), "w") as f:
    json.dump(
        {
            "rank": rank,
            "backend": comm.backend,
            "flavor": fk.FLAVOR,
            "raw": raw.logs,
            "seen": seen.logs,
            "weights": seen.weights,
            "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "stopped_epoch": stopper.stopped_epoch,
            "best_epoch": stopper.best_epoch,
            "final": weights_fingerprint(model.get_weights()),
            "touched": touched,
        },
        f,
    )
