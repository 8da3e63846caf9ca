#!/usr/bin/env python
"""Example data-parallel Keras training with forge_dist's production callbacks.

    python scripts/train.py --checkpoint-dir ./runs/exp1                # one process
    mpirun -np 2 python scripts/train.py --backend mpi --checkpoint-dir s3://bucket/exp1
    scripts/launch_horovod.sh --checkpoint-dir ./runs/exp1               # horovodrun --gloo

Synthetic regression data by default (each rank gets its own shard; with ``--shard``
every rank holds the same data and trains on its part, so a mid-epoch checkpoint resumes
on any number of ranks). ``--resume``
restores the newest checkpoint that verifies and continues exactly where it stopped,
mid-epoch included. SIGUSR1 or SIGTERM to any rank makes every rank save once and exit
with 75 (forge_dist.preemption.PREEMPTED_EXIT_CODE); slurm/*.sbatch requeue on it.
Keras 3 by default; ``TF_USE_LEGACY_KERAS=1`` for tf_keras. With ``--backend tf`` the
MultiWorkerMirroredStrategy cluster comes from ``TF_CONFIG``, or from SLURM's variables
under ``srun``. ``--report FILE`` writes what this rank decided (stop epoch, learning
rate, weight fingerprint) as JSON; ``{rank}`` in FILE is replaced by the rank.
``--tensorboard-dir URL`` adds the chief's TensorBoard logger; ``--alert-url URL``
posts a JSON alert there, once, from the chief, when val_loss first drops below
``--alert-below`` (the tutorial's own alert callback, run through ``extra=[...]``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys

from forge_dist.preemption import Preempted, catch_early

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto", choices=["auto", "local", "mpi", "horovod", "tf"])
    ap.add_argument("--checkpoint-dir", required=True, help="checkpoint root: any fsspec URL")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    ap.add_argument(
        "--resume-step",
        type=int,
        metavar="N",
        help="continue from step N (forge-dist ls shows them)",
    )
    ap.add_argument(
        "--resume-epoch-end",
        action="store_true",
        help="continue from the newest checkpoint taken at an epoch's end (e.g. on another "
        "number of ranks, where a mid-epoch position does not carry over)",
    )
    ap.add_argument(
        "--optimizer",
        choices=["forge", "horovod"],
        default="forge",
        help="gradient averaging: forge_dist's DistributedOptimizer, or Horovod's "
        "own (tf_keras only: Horovod's is broken on Keras 3)",
    )
    ap.add_argument("--samples", type=int, default=512, help="training samples per rank")
    ap.add_argument(
        "--shard",
        action="store_true",
        help="every rank holds the same --samples samples and trains on its part of each "
        "global batch (fit_resumed(shard=True)): a mid-epoch checkpoint then resumes on "
        "any number of ranks",
    )
    ap.add_argument(
        "--async-save",
        action="store_true",
        help="write checkpoints in the background (not under MultiWorkerMirroredStrategy)",
    )
    ap.add_argument(
        "--allow-fresh-start",
        action="store_true",
        help="a requeued job (SLURM_RESTART_COUNT > 0) that finds no checkpoint starts over "
        "instead of failing",
    )
    ap.add_argument(
        "--local-dir",
        default=None,
        help="two tiers: commit each checkpoint to this node-local folder first and copy it "
        "to --checkpoint-dir in the background; resume from the newer of the two",
    )
    ap.add_argument("--storage-options", default=None, help="fsspec options as JSON")
    ap.add_argument("--report", default=None, help="write this rank's summary JSON here")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--tensorboard-dir", default=None, help="TensorBoard log dir: any URL")
    ap.add_argument("--alert-url", default=None, help="POST an alert here (see --alert-below)")
    ap.add_argument("--alert-below", type=float, default=0.5)
    ap.add_argument(
        "--poison-rank",
        type=int,
        default=None,
        metavar="RANK",
        help="(tests) this rank's targets hold an infinite value: its loss turns infinite",
    )
    ap.add_argument(
        "--signal-before-fit",
        type=int,
        default=None,
        metavar="RANK",
        help="(tests) this rank sends itself SIGUSR1 after the restore, before fit",
    )
    return ap.parse_args(argv)


def threshold_alert(url: str, below: float, keras: object) -> object:
    """The tutorial's alert: POST to a webhook when val_loss first drops below a
    threshold. Plain Keras; production_callbacks(extra=[...]) runs it once, on the
    chief, with the values every rank agreed on."""
    import urllib.request

    class ThresholdAlert(keras.callbacks.Callback):  # type: ignore[attr-defined,name-defined]
        fired = False

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            value = (logs or {}).get("val_loss")
            if self.fired or value is None or value >= below:
                return
            body = json.dumps({"epoch": epoch + 1, "val_loss": value}).encode()
            req = urllib.request.Request(url, data=body, method="POST")
            req.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(req, timeout=10) as answer:
                answer.read()
            self.fired = True

    return ThresholdAlert()


def watch_root(root: str, touched: list[str]) -> None:
    """Record every file operation this process makes under a local checkpoint root (for
    the report: only the chief may appear there)."""
    root = os.path.abspath(root)
    events = {
        "open",
        "os.mkdir",
        "os.rename",
        "os.replace",
        "os.remove",
        "os.unlink",
        "os.rmdir",
        "os.listdir",
        "os.scandir",
        "shutil.rmtree",
    }

    def hook(event: str, eargs: tuple) -> None:
        if event in events:
            for a in eargs[:2]:
                if isinstance(a, (str, bytes, os.PathLike)):
                    p = os.path.abspath(os.fsdecode(a))
                    if p == root or p.startswith(root + os.sep):
                        touched.append(f"{event} {p}")

    sys.addaudithook(hook)


def main(argv: list[str] | None = None) -> int:
    catch_early()  # a preemption signal from now on is held, not fatal
    args = parse_args(argv)
    touched: list[str] = []
    if args.report and "://" not in args.checkpoint_dir:
        watch_root(args.checkpoint_dir, touched)
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()  # a resumed run can match bit for bit

    from forge_dist import get_communicator
    from forge_dist import keras as fk
    from forge_dist.keras import _compat

    keras = _compat.keras
    strategy = None
    if args.backend == "tf" and (os.environ.get("TF_CONFIG") or os.environ.get("SLURM_STEP_ID")):
        # One process per worker (scripts/launch_mwms.sh, or srun in
        # slurm/train_mwms.sbatch); every collective, the strategy's included, is bounded
        # by the same deadline.
        from forge_dist.comm.base import resolve_timeout

        resolver = None
        if not os.environ.get("TF_CONFIG"):
            # Hosts and task index from SLURM; every task of a job picks the same ports.
            port_base = int(os.environ.get("FORGE_MWMS_PORT_BASE", "0")) or 20000 + (
                int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
            )
            gpu_args: dict = {}
            if not os.environ.get("SLURM_GPUS_ON_NODE"):
                # CPU nodes: the resolver pairs every task with a GPU slot (and counts
                # them with nvidia-smi), so zero GPUs would list no tasks. Give it one
                # slot per task and set nothing from them.
                tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ["SLURM_NTASKS"])
                gpu_args = {"gpus_per_node": tasks, "gpus_per_task": 1, "auto_set_gpu": False}
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
                port_base=port_base, **gpu_args
            )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=resolve_timeout()
            ),
        )
    scope = strategy.scope if strategy is not None else contextlib.nullcontext
    with scope():
        comm = get_communicator(args.backend)
    rank, size = comm.rank, comm.size
    options = json.loads(args.storage_options) if args.storage_options else None

    rng = np.random.default_rng(args.seed + (0 if args.shard else rank))
    w = np.linspace(-1, 1, 16).astype("float32")[:, None]

    def shard(n: int, drift: float) -> tuple:
        x = rng.normal(size=(n, 16)).astype("float32")
        y = np.tanh(x @ w) + 0.5 * rng.normal(size=(n, 1))
        return x, (y + drift * x[:, :1] ** 2).astype("float32")

    x_train, y_train = shard(args.samples, 0.0)
    if args.shard:  # the whole training set on every rank; each its own validation set
        rng = np.random.default_rng(args.seed + 1000 + rank)
    if args.poison_rank == rank:
        y_train[3 * args.batch_size + 1, 0] = np.inf  # in the 4th batch of the 1st epoch
    # Each rank validates on its own shard; the last rank's drifts from the task.
    x_val, y_val = shard(max(64, args.samples // 2), 0.3 if rank == size - 1 else 0.0)

    keras.utils.set_random_seed(args.seed)
    with scope():
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        opt = keras.optimizers.Adam(args.learning_rate)
        if size > 1 and args.optimizer == "horovod":
            if _compat.FLAVOR != "tf_keras":
                sys.exit("--optimizer horovod needs tf_keras (TF_USE_LEGACY_KERAS=1)")
            import horovod.tensorflow.keras as hvd_keras

            opt = hvd_keras.DistributedOptimizer(opt)
        elif size > 1:
            # Under a tf.distribute strategy this returns the optimizer unchanged.
            opt = fk.DistributedOptimizer(opt, communicator=comm)
        model.compile(optimizer=opt, loss="mse")

    restored = None
    if args.resume or args.resume_step is not None or args.resume_epoch_end:
        restored = fk.restore_latest(  # the chief says what it restored
            model,
            args.checkpoint_dir,
            storage_options=options,
            communicator=comm,
            step=args.resume_step,
            epoch_end_only=args.resume_epoch_end,
            allow_fresh_start=args.allow_fresh_start,
            local_directory=args.local_dir,
        )
    if args.signal_before_fit == rank:
        import signal

        os.kill(os.getpid(), signal.SIGUSR1)
    extra = []
    if args.alert_url:
        extra.append(threshold_alert(args.alert_url, args.alert_below, keras))
    with scope():
        callbacks = fk.production_callbacks(
            args.checkpoint_dir,
            monitor="val_loss",
            patience=args.patience,
            reduce_lr_patience=1,
            reduce_lr_factor=0.5,
            tensorboard_dir=args.tensorboard_dir,
            async_save=args.async_save,
            checkpoint={"local_directory": args.local_dir} if args.local_dir else None,
            extra=extra,
            storage_options=options,
            communicator=comm,
            verbose=1 if rank == 0 else 0,
        )
    es = next(c for c in callbacks if isinstance(c, fk.SyncEarlyStopping))
    preempted: Preempted | None = None
    try:
        fk.fit_resumed(
            model,
            restored,
            x_train,
            y_train,
            validation_data=(x_val, y_val),
            epochs=args.epochs,
            batch_size=args.batch_size,
            shuffle=False,  # the same batches in the same order: resumable mid-epoch
            verbose=2 if rank == 0 else 0,
            callbacks=callbacks,
            shard=args.shard,
        )
    except Preempted as stop:  # every rank: the checkpoint is committed
        preempted = stop
    except Exception as error:  # what this rank learned, on disk before mpirun ends it
        if args.report:
            path = args.report.replace("{rank}", str(rank))
            with open(path, "w") as f:
                json.dump({"rank": rank, "error": f"{type(error).__name__}: {error}"}, f)
        raise
    if args.report:
        report = {
            "rank": rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "size": size,
            "backend": comm.backend,
            "keras": _compat.FLAVOR,
            "stopped_epoch": es.stopped_epoch,
            "best_epoch": es.best_epoch,
            "learning_rate": _compat.get_lr(model.optimizer),
            "fingerprint": _compat.weights_fingerprint(model.get_weights()),
            "touched_root": len(touched),
            "resumed_step": restored.step if restored else None,
            "resumed_batch": restored.initial_batch if restored else None,
            "resumed_from": restored.read_from if restored else None,
            "preempted": None
            if preempted is None
            else {
                "signal": preempted.signal_name,
                "step": preempted.step,
                "epoch": preempted.epoch,
                "batch": preempted.batch,
            },
        }
        path = args.report.replace("{rank}", str(rank))
        with open(path, "w") as f:
            json.dump(report, f)
    return 0 if preempted is None else int(preempted.code)


if __name__ == "__main__":
    from forge_dist.errors import ForgeDistError

    try:
        sys.exit(main())
    except ForgeDistError as error:  # the message says what and where: no traceback
        sys.exit(f"train.py: {type(error).__name__}: {error}")
