"""Training program for the multi-process tests (run under ``mpirun -np 2``).

Every rank trains a small MLP on its own shard and validates on its own shard; the odd
ranks' validation labels disagree with the task, so plain Keras EarlyStopping stops the ranks at
different epochs. Results (per-epoch weight fingerprints, learning rates, stop epoch and
every file operation under the checkpoint root) go to ``<out>/rank-<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["forge", "control"], default="forge")
ap.add_argument("--root", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--epochs", type=int, default=6)
ap.add_argument("--samples", type=int, default=256, help="training samples per rank")
ap.add_argument("--patience", type=int, default=1)
ap.add_argument("--kill-rank0-after-epoch", type=int, default=None)
ap.add_argument("--kill-rank1-at-epoch", type=int, default=None)
ap.add_argument("--kill-rank", type=int, default=1, help="which rank --kill-rank1-at-epoch kills")
ap.add_argument("--stop-rank1-at-epoch", type=int, default=None, help="SIGSTOP: a hung rank")
ap.add_argument(
    "--hold-save-at-epoch",
    type=int,
    default=None,
    help="the chief stops inside the save after this epoch (a file written, no manifest "
    "yet), says so in OUT/holding, and waits for SIGUSR2 to go on (or to be killed)",
)
ap.add_argument("--resume", action="store_true")
ap.add_argument(
    "--local-dir", default=None, help="two tiers: the chief commits here, copies to --root"
)
ap.add_argument("--bad", default=None, help="a misconfiguration to construct")
ap.add_argument("--bad-rank", type=int, default=None, help="--bad on this rank only")
ap.add_argument("--backend", default="mpi", choices=["mpi", "horovod", "auto"])
ap.add_argument(
    "--hvd-optimizer",
    action="store_true",
    help="Horovod's own DistributedOptimizer (tf_keras) instead of forge_dist's",
)
args = ap.parse_args()

root = args.root if "://" in args.root else os.path.abspath(args.root)
touched: list[str] = []


def audit(event: str, eargs: tuple) -> None:
    if event in (
        "open",
        "os.mkdir",
        "os.rename",
        "os.remove",
        "os.rmdir",
        "os.listdir",
        "os.scandir",
        "shutil.rmtree",
        "os.replace",
        "os.unlink",
    ):
        for a in eargs[:2]:
            if isinstance(a, (str, bytes, os.PathLike)):
                p = os.fsdecode(a)
                full = os.path.abspath(p)
                if full == root or full.startswith(root + os.sep):
                    touched.append(f"{event} {p}")


sys.addaudithook(audit)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.experimental.enable_op_determinism()

from forge_dist.comm import get_communicator  # noqa: E402
from forge_dist.keras import _compat  # noqa: E402

keras = _compat.keras
comm = get_communicator(args.backend)
rank, size = comm.rank, comm.size


def data(seed: int, n: int, flip: bool) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    w = np.linspace(-1, 1, 8).astype("float32")[:, None]
    y = np.tanh(x @ w) + 0.05 * rng.normal(size=(n, 1)).astype("float32")
    return x, (-y if flip else y).astype("float32")


x_train, y_train = data(100 + rank, args.samples, False)
x_val, y_val = data(200 + rank, 128, flip=(rank % 2 == 1))  # odd ranks disagree

# Different initial weights per rank: BroadcastInitialState must make them equal.
keras.utils.set_random_seed(1234 + rank)
model = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
)
opt = keras.optimizers.Adam(0.01)

from forge_dist import keras as fk  # noqa: E402

if args.mode == "forge" and args.hvd_optimizer:
    import horovod.tensorflow.keras as hvd_keras

    opt = hvd_keras.DistributedOptimizer(opt)
elif args.mode == "forge":
    opt = fk.DistributedOptimizer(opt)
model.compile(optimizer=opt, loss="mse")

record = {
    "rank": rank,
    "pid": os.getpid(),
    "size": size,
    "host": socket.gethostname(),
    "flavor": _compat.FLAVOR,
    "backend": comm.backend,
    "fingerprints": [],
    "lrs": [],
    "epochs_run": 0,
}


def save_record() -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"rank-{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)  # whole or absent, for a test that reads it while we run


def failed(error: Exception) -> None:
    """What this rank said, on disk before the launcher ends it."""
    record["error"] = f"{type(error).__name__}: {error}"
    record["error_at"] = time.time()
    save_record()


def hold_in_save(point: str) -> None:
    """Once: say where, and wait for SIGUSR2 (go on with the save) or a SIGKILL."""
    from forge_dist.storage import _faults

    if point.startswith("file-written:"):
        _faults.hook = None
        signal.signal(signal.SIGUSR2, lambda *_: None)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "holding.tmp"), "w") as f:
            json.dump({"pid": os.getpid(), "point": point}, f)
        os.replace(os.path.join(args.out, "holding.tmp"), os.path.join(args.out, "holding"))
        signal.pause()


class Recorder(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        record["fingerprints"].append(_compat.weights_fingerprint(self.model.get_weights()))
        record["lrs"].append(float(_compat.get_lr(self.model.optimizer)))
        record["epochs_run"] = epoch + 1
        record["val_loss"] = float(logs["val_loss"])
        record.setdefault("val_losses", []).append(float(logs["val_loss"]))
        if args.kill_rank0_after_epoch == epoch and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_begin(self, epoch, logs=None):
        if args.hold_save_at_epoch == epoch and rank == 0:
            from forge_dist.storage import _faults

            _faults.hook = hold_in_save
        if args.kill_rank1_at_epoch == epoch and rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.stop_rank1_at_epoch == epoch and rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)


initial_epoch = 0
if args.mode == "control":
    os.makedirs(root, exist_ok=True)
    callbacks = [
        keras.callbacks.EarlyStopping(patience=args.patience, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(os.path.join(root, "best.keras"), save_best_only=True),
        Recorder(),
    ]
else:
    if args.bad and args.bad_rank in (None, comm.rank):
        kwargs = json.loads(args.bad)
        cls = getattr(fk, kwargs.pop("class"))
        cls(**kwargs)  # must raise (on every rank, or on --bad-rank alone)
    if args.resume:
        try:
            restored = fk.restore_latest(model, root, local_directory=args.local_dir)
        except Exception as error:
            failed(error)
            raise
        initial_epoch = restored.initial_epoch
        record["resumed_from_step"] = restored.step
    es = fk.SyncEarlyStopping(patience=args.patience, restore_best_weights=True)
    ckpt = fk.ChiefModelCheckpoint(root, keep_last=2, keep_best=1, local_directory=args.local_dir)
    callbacks = [
        fk.BroadcastInitialState(),
        fk.SyncMetrics(),
        fk.SyncReduceLROnPlateau(patience=1, factor=0.5),
        es,
        fk.ChiefTensorBoard(os.path.join(root, "tb")),  # under the root: rank 1 must not touch it
        ckpt,
        fk.ChiefCSVLogger(os.path.join(root, "history.csv")),
        fk.ConsistencyGuard(),
        Recorder(),
    ]


try:
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=args.epochs,
        batch_size=32,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        initial_epoch=initial_epoch,
    )
except Exception as error:
    failed(error)
    raise
record["final_fingerprint"] = _compat.weights_fingerprint(model.get_weights())
record["final_lr"] = float(_compat.get_lr(model.optimizer))
record["history_epochs"] = len(history.history.get("loss", []))
record["touched"] = list(touched)
if args.mode == "forge":
    record["stopped_epoch"] = es.stopped_epoch
    record["best_epoch"] = es.best_epoch
    record["saved_steps"] = ckpt.saved_steps
    if args.local_dir:
        record["restored_from"] = restored.read_from if args.resume else None
save_record()
