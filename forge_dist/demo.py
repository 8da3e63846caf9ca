"""The training behind ``forge-dist demo`` (run by the CLI in child processes).

Two ranks train one small Keras model data-parallel on synthetic data with the
production stack. Each rank validates on its own shard, and rank 1's shard drifts away
from the task as training goes on, so the ranks would disagree about "improved" on
their own; the synced callbacks decide once for both. The chief prints one line per
epoch and the decisions taken, and writes a summary for the CLI.

    python -m forge_dist.demo --url DIR --summary FILE [--epochs N] [--strategy]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--summary", required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument(
        "--strategy",
        action="store_true",
        help="one process, MirroredStrategy over 2 logical CPUs (no MPI)",
    )
    ap.add_argument("--storage-options", default=None)
    return ap.parse_args()


def set_up_tensorflow(strategy: bool) -> Any:
    """One TF thread per process; with ``strategy``, MirroredStrategy over 2 logical CPUs."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if not strategy:
        return None
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def make_data(rank: int, strategy: Any) -> tuple:
    """A small noisy training shard per rank: validation improves, then the model
    overfits. Rank 1's validation shard also drifts, so the ranks disagree about
    "improved"."""
    import numpy as np

    rng = np.random.default_rng(10 + rank)
    w = np.linspace(-1, 1, 16).astype("float32")[:, None]

    def shard(n: int, drift: float) -> tuple:
        x = rng.normal(size=(n, 16)).astype("float32")
        y = np.tanh(x @ w) + 0.5 * rng.normal(size=(n, 1))  # noisy labels: it will overfit
        return x, (y + drift * x[:, :1] ** 2).astype("float32")

    train = shard(1024 if strategy else 512, 0.0)
    val = shard(512, 0.3 if rank == 1 or strategy else 0.0)
    return train, val


def build_model(distributed: bool) -> Any:
    from forge_dist import keras as fk
    from forge_dist.keras import _compat

    keras = _compat.keras
    keras.utils.set_random_seed(42)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    opt = keras.optimizers.Adam(3e-3)
    if distributed:
        opt = fk.DistributedOptimizer(opt)
    model.compile(optimizer=opt, loss="mse")
    return model


def progress_callback(
    stack: list, restored: Any, args: Any, rank: int, how: str, how_reduced: str
) -> Any:
    """A callback that prints one line per epoch on the chief, with the decisions."""
    from forge_dist import keras as fk
    from forge_dist.keras import _compat

    es = next(c for c in stack if isinstance(c, fk.SyncEarlyStopping))
    ckpt = next(c for c in stack if isinstance(c, fk.ChiefModelCheckpoint))

    class Progress(_compat.keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.t0 = time.perf_counter()
            self.lr = _compat.get_lr(self.model.optimizer)
            if rank == 0:
                print(f"training on {how}; checkpoints -> {ckpt.directory}", flush=True)
                if restored.restored:
                    step, epoch = restored.step, restored.epoch + 1
                    print(f"resumed from step {step} (epoch {epoch})", flush=True)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if rank != 0:
                return
            lr = _compat.get_lr(self.model.optimizer)
            notes = []
            if ckpt.saved_steps and ckpt.saved_steps[-1] == ckpt.last_saved_step:
                notes.append(f"saved step {ckpt.last_saved_step}")
            if lr != self.lr:
                notes.append(f"plateau: lr {self.lr:.4g} -> {lr:.4g}")
            if self.model.stop_training:
                notes.append(f"stop (no improvement for {es.wait} epochs)")
            self.lr = lr
            print(
                f"epoch {epoch + 1:>2}/{args.epochs}  loss {logs['loss']:.4f}  "
                f"val_loss {logs['val_loss']:.4f} ({how_reduced})  "
                f"{time.perf_counter() - self.t0:5.1f}s  " + "; ".join(notes),
                flush=True,
            )

    return Progress()


def summary(stack: list, model: Any, args: Any, size: int, replicas: int, strategy: Any) -> dict:
    from forge_dist import keras as fk
    from forge_dist.keras import _compat

    es = next(c for c in stack if isinstance(c, fk.SyncEarlyStopping))
    plateau = next(c for c in stack if isinstance(c, fk.SyncReduceLROnPlateau))
    ckpt = next(c for c in stack if isinstance(c, fk.ChiefModelCheckpoint))
    guard = next(c for c in stack if isinstance(c, fk.ConsistencyGuard))
    return {
        "launcher": "MirroredStrategy" if strategy else "mpirun",
        "ranks": size,
        "replicas": replicas,
        "epochs_run": (es.stopped_epoch + 1) if es.stopped_epoch else args.epochs,
        "stopped_early": es.stopped_epoch > 0,
        "best_epoch": es.best_epoch + 1,
        "best_val_loss": es.best,
        "restored_best": bool(es.config.restore_best_weights and es.state.has_best_weights),
        "final_lr": _compat.get_lr(model.optimizer),
        "plateau_wait": plateau.wait,
        "checkpoints_committed": len(ckpt.saved_steps),
        "guard_checks": len(guard.fingerprints),
        "guard_mismatches": guard.mismatches,
        "url": ckpt.directory,
    }


def main() -> int:
    args = parse_args()
    strategy = set_up_tensorflow(args.strategy)

    from forge_dist import get_communicator
    from forge_dist import keras as fk

    scope = strategy.scope if strategy else contextlib.nullcontext
    with scope():
        comm = get_communicator("tf" if strategy else "mpi")
    rank, size = comm.rank, comm.size
    replicas = strategy.num_replicas_in_sync if strategy else size
    options = json.loads(args.storage_options) if args.storage_options else None
    (x_train, y_train), validation = make_data(rank, strategy)
    with scope():
        model = build_model(distributed=not strategy)
        restored = fk.restore_latest(model, args.url, storage_options=options)
        stack = fk.production_callbacks(
            args.url,
            monitor="val_loss",
            patience=3,
            reduce_lr_patience=1,
            reduce_lr_factor=0.5,
            keep_last=2,
            keep_best=1,
            storage_options=options,
            verbose=0,
        )
    if strategy:
        how = f"MirroredStrategy, {replicas} replicas in 1 process"
        how_reduced = f"global over {replicas} replicas"
    else:
        how, how_reduced = f"mpirun, {size} processes", f"mean of {size} ranks, synced"
    # The stack saves and exits on a preemption signal; a resumed run continues exactly
    # where that save was taken, mid-epoch included.
    fk.fit_resumed(
        model,
        restored,
        x_train,
        y_train,
        validation_data=validation,
        epochs=args.epochs,
        batch_size=32,
        shuffle=False,
        verbose=0,
        callbacks=[*stack, progress_callback(stack, restored, args, rank, how, how_reduced)],
    )
    if rank == 0:
        with open(args.summary, "w") as f:
            json.dump(summary(stack, model, args, size, replicas, strategy), f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
