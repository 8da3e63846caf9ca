"""Worker for bench_keras.py: run alone or under ``mpirun -np 2``; prints one JSON line
from rank 0."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from forge_dist import get_communicator  # noqa: E402
from forge_dist import keras as fk  # noqa: E402
from forge_dist.keras import _compat  # noqa: E402

keras = _compat.keras
what = sys.argv[1]
backend = sys.argv[2] if len(sys.argv) > 2 else "auto"
if backend == "tf" and os.environ.get("TF_CONFIG"):  # a MultiWorkerMirroredStrategy worker
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        comm = get_communicator("tf")
else:
    comm = get_communicator(backend)


def small_model(distributed: bool, horovods_own: bool = False):
    keras.utils.set_random_seed(0)
    m = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    opt = keras.optimizers.Adam(1e-3)
    if horovods_own:
        import horovod.tensorflow.keras as hvd_keras

        opt = hvd_keras.DistributedOptimizer(opt)
    elif distributed:
        opt = fk.DistributedOptimizer(opt, communicator=comm)
    m.compile(optimizer=opt, loss="mse")
    return m


def epoch_overhead(epochs: int = 400, block: int = 25) -> dict:
    """One epoch end of ``SyncMetrics`` + ``SyncEarlyStopping`` vs plain Keras'
    ``EarlyStopping``, every epoch started together after a barrier, in alternating
    blocks of ``block`` epochs (medians over the blocks after the first two). Blocks,
    not epoch by epoch: plain Keras runs a TensorFlow op every epoch, and with 8 ranks
    on 2 cores its aftermath landed in the next epoch's synced end (up to 2x its time)."""
    model = small_model(False)
    logs0 = {"loss": 0.5, "mae": 0.3, "val_loss": 0.6, "val_mae": 0.4, "learning_rate": 1e-3}
    sync = fk.SyncMetrics(communicator=comm)
    es = fk.SyncEarlyStopping(patience=10**6, communicator=comm)
    plain = keras.callbacks.EarlyStopping(patience=10**6)
    for cb in (sync, es, plain):
        cb.set_model(model)
        cb.on_train_begin()
    times: dict[bool, list[float]] = {True: [], False: []}
    rng = np.random.default_rng(comm.rank)
    for epoch in range(epochs):
        forge = (epoch // block) % 2 == 0
        logs = {k: v + float(rng.normal()) * 0.01 for k, v in logs0.items()}
        comm.barrier(name="bench-align")  # start every epoch together
        t = time.perf_counter()
        if forge:
            sync.on_epoch_end(epoch, logs)
            es.on_epoch_end(epoch, logs)
        else:
            plain.on_epoch_end(epoch, dict(logs))
        if epoch >= 2 * block:  # the first block of each: warm-up
            times[forge].append(time.perf_counter() - t)
    return {
        "forge_ms": 1e3 * statistics.median(times[True]),
        "plain_ms": 1e3 * statistics.median(times[False]),
    }


def step_time(
    distributed: bool, steps: int = 64, epochs: int = 4, horovods_own: bool = False
) -> dict:
    model = small_model(distributed, horovods_own)
    rng = np.random.default_rng(comm.rank)
    x = rng.normal(size=(steps * 64, 32)).astype("float32")
    y = rng.normal(size=(steps * 64, 1)).astype("float32")
    times = []

    class T(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append((time.perf_counter() - self.t) / steps)

    cbs = [T()] + ([fk.BroadcastInitialState(communicator=comm)] if distributed else [])
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, shuffle=False, callbacks=cbs)
    out = {"step_ms": 1e3 * statistics.median(times[1:])}
    if distributed and not horovods_own and comm.backend != "horovod":
        # Time spent in the gradient all-reduce itself, per step.
        opt = model.optimizer
        avg = opt._forge_dist_average
        flat = np.zeros(
            sum(int(np.prod(v.shape)) for v in model.trainable_variables), dtype=np.float32
        )
        ts = []
        for _ in range(50):
            comm.barrier(name="bench-align")
            t = time.perf_counter()
            avg(flat)
            ts.append(time.perf_counter() - t)
        out["allreduce_ms"] = 1e3 * statistics.median(ts)
        out["gradient_mb"] = flat.nbytes / 1e6
    return out


def written_bytes() -> int:
    """Bytes this process has passed to write() so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def bytes_per_save(root: str, saves: int = 3) -> dict:
    """Bytes every rank writes for one checkpoint: plain Keras 3 ``ModelCheckpoint`` (each
    rank saves the same file) vs ``ChiefModelCheckpoint`` (the chief alone)."""
    model = small_model(False)
    model.fit(np.zeros((64, 32), "float32"), np.zeros((64, 1), "float32"), verbose=0)
    plain = keras.callbacks.ModelCheckpoint(os.path.join(root, "plain", "model.keras"))
    forge = fk.ChiefModelCheckpoint(os.path.join(root, "forge"), communicator=comm)
    out = {}
    for name, cb in (("plain", plain), ("forge", forge)):
        cb.set_model(model)
        cb.on_train_begin()
        os.makedirs(os.path.join(root, "plain"), exist_ok=True)
        total = 0
        for epoch in range(saves):
            model.optimizer.iterations.assign_add(1)
            comm.barrier(name="bench-align")
            before = written_bytes()
            cb.on_epoch_end(epoch, {"loss": 1.0, "val_loss": 1.0})
            total += written_bytes() - before
            comm.barrier(name="bench-align")
        out[name] = [int(b) / saves for b in comm.allgather(total, name="bench-bytes")]
    return {"bytes_per_rank": out}


def tensorboard_epoch(root: str, epochs: int = 200) -> dict:
    """Per epoch end: ChiefTensorBoard (synced scalars, chief writes and flushes) vs
    plain Keras TensorBoard on every rank; interleaved, medians, on the chief."""
    import os

    model = small_model(False)
    model.fit(np.zeros((64, 32), "float32"), np.zeros((64, 1), "float32"), verbose=0)
    ours = fk.ChiefTensorBoard(os.path.join(root, "forge"), write_graph=False, communicator=comm)
    plain = keras.callbacks.TensorBoard(os.path.join(root, f"plain-{comm.rank}"), write_graph=False)
    for cb in (ours, plain):
        cb.set_model(model)
        cb.on_train_begin()
    logs0 = {"loss": 0.5, "mae": 0.3, "val_loss": 0.6, "val_mae": 0.4}
    forge_t, plain_t = [], []
    for epoch in range(epochs):
        logs = {k: v + epoch * 1e-4 for k, v in logs0.items()}
        comm.barrier(name="bench-align")
        t = time.perf_counter()
        ours.on_epoch_end(epoch, dict(logs))
        forge_t.append(time.perf_counter() - t)
        comm.barrier(name="bench-align")
        t = time.perf_counter()
        plain.on_epoch_end(epoch, dict(logs))
        plain_t.append(time.perf_counter() - t)
    for cb in (ours, plain):
        cb.on_train_end()
    return {
        "forge_ms": 1e3 * statistics.median(forge_t[10:]),
        "plain_ms": 1e3 * statistics.median(plain_t[10:]),
    }


if what == "epoch":
    result = epoch_overhead()
elif what == "tensorboard":
    result = tensorboard_epoch(sys.argv[3])
elif what == "bytes":
    result = bytes_per_save(sys.argv[3])
elif what == "step":
    result = step_time(distributed=comm.size > 1)
elif what == "step-horovod-own":  # Horovod's DistributedOptimizer (tf_keras)
    result = step_time(distributed=True, horovods_own=True)
elif what == "step-unsynced":  # 2 ranks training independently: the cost of sharing cores
    result = step_time(distributed=False)
else:
    raise SystemExit(f"unknown benchmark {what}")
if comm.rank == 0:
    print(json.dumps({"what": what, "ranks": comm.size, **result}), flush=True)
