"""Program for the "on every rank" tests (under ``mpirun -np 2``): one real fault or
desync per case, and what each rank saw, written to ``OUT`` with ``{rank}`` replaced.

    mpirun -np 2 python _every_rank.py CASE ROOT OUT

CASE is one of:

* ``metric-names``: rank 1 compiles one more metric than rank 0 (different log keys);
* ``csv-fail``: the chief's CSV folder is replaced by a file after epoch 0 (the disk under
  it went away);
* ``async-fail``: the checkpoint root is a full filesystem by the first save (ROOT is a
  small tmpfs the test mounted; the chief fills it after the pre-flight);
* ``async-skip``: ``when_busy="skip"``, the chief's first background save held until the
  second save point has been decided;
* ``guard-warn`` / ``guard-repair``: rank 1's weights are nudged after epoch 1's step;
* ``tb-batch``: ``ChiefTensorBoard(update_freq="batch")`` under ROOT/tb, every rank
  recording its own batch losses.

Every rank catches what the fit raised and reports it, so the test reads each rank's own
outcome (a rank that exited early would have the launcher kill the others first).
"""

from __future__ import annotations

import json
import os
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

case, root, out = sys.argv[1], sys.argv[2], sys.argv[3]

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from forge_dist import get_communicator  # noqa: E402
from forge_dist import keras as fk  # noqa: E402
from forge_dist.keras import _compat  # noqa: E402
from forge_dist.storage import _faults  # noqa: E402

keras = _compat.keras
comm = get_communicator("mpi")
rank = comm.rank
rng = np.random.default_rng(10 + rank)
x = rng.normal(size=(128, 4)).astype("float32")
y = (x @ np.array([[1.0], [-1.0], [0.5], [0.0]])).astype("float32")

keras.utils.set_random_seed(5)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
metrics = ["mae"] if case == "metric-names" and rank == 1 else []
model.compile(
    optimizer=fk.DistributedOptimizer(keras.optimizers.Adam(0.01)), loss="mse", metrics=metrics
)
report: dict = {"rank": rank, "pid": os.getpid(), "case": case, "error": None, "epochs_ended": []}


class Record(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        report["epoch"] = epoch

    def on_epoch_end(self, epoch, logs=None):
        report["epochs_ended"].append(epoch)


class BreakCsvFolder(keras.callbacks.Callback):
    """Chief: after epoch 0 the CSV's folder becomes a file (nothing can be written)."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and rank == 0:
            folder = os.path.join(root, "csv")
            for name in os.listdir(folder):
                os.unlink(os.path.join(folder, name))
            os.rmdir(folder)
            with open(folder, "w") as f:
                f.write("not a folder")


class FillDisk(keras.callbacks.Callback):
    """Chief: after the pre-flight, fill the checkpoint root's filesystem."""

    def on_train_begin(self, logs=None):
        if rank == 0:
            with open(os.path.join(root, "filler"), "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError as e:
                    report["filled"] = e.errno


class Nudge(keras.callbacks.Callback):
    """Rank 1: after epoch 1, weights that differ from everyone else's (a silent desync)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1 and rank == 1:
            self.model.set_weights([w + 1e-3 for w in self.model.get_weights()])


class BatchLosses(keras.callbacks.Callback):
    """This rank's own batch logs, before anything syncs them."""

    def on_train_batch_end(self, batch, logs=None):
        report.setdefault("batch_losses", []).append(float(logs["loss"]))


released = threading.Event()


class Release(keras.callbacks.Callback):
    """After the checkpoint's epoch-1 decision: let the held background save go on, and
    have it committed before epoch 2's save point (which then saves)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            released.set()

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2 and ckpt.async_checkpointer is not None:
            ckpt.async_checkpointer.wait_until_finished()


def hold_first_save(point: str) -> None:
    if threading.current_thread() is threading.main_thread() or released.is_set():
        return
    report["held_at"] = point
    if not released.wait(120):
        raise RuntimeError("the test never released the background save")


sync = fk.SyncMetrics()
callbacks: list = [fk.BroadcastInitialState(), sync]
ckpt = None
guard = None
if case == "csv-fail":
    os.makedirs(os.path.join(root, "csv"), exist_ok=True)
    callbacks += [BreakCsvFolder(), fk.ChiefCSVLogger(os.path.join(root, "csv", "h.csv"))]
elif case == "async-fail":
    ckpt = fk.ChiefModelCheckpoint(os.path.join(root, "ckpt"), async_save=True, keep_last=1)
    callbacks += [ckpt, FillDisk()]  # (its on_train_begin after the checkpoint's pre-flight)
elif case == "async-skip":
    if rank == 0:
        _faults.hook = hold_first_save
    ckpt = fk.ChiefModelCheckpoint(root, async_save=True, when_busy="skip")
    callbacks += [ckpt, Release()]
elif case.startswith("guard-"):
    guard = fk.ConsistencyGuard(on_mismatch=case.split("-", 1)[1])
    callbacks += [Nudge(), guard]
elif case == "tb-batch":
    tb = fk.ChiefTensorBoard(os.path.join(root, "tb"), update_freq="batch", write_graph=False)
    callbacks += [BatchLosses(), tb]
callbacks.append(Record())

try:
    model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks)
except Exception as e:  # noqa: BLE001 - reported, the test checks it
    report["error"] = f"{type(e).__name__}: {e}"
report["fingerprint"] = _compat.weights_fingerprint(model.get_weights())
if ckpt is not None:
    report["saved_steps"] = ckpt.saved_steps
if guard is not None:
    report["mismatches"] = guard.mismatches
with open(out.replace("{rank}", str(rank)), "w") as f:
    json.dump(report, f)
