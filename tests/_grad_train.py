"""Training program for the gradient-averaging test: N ranks on batches of b samples each
must end where one process ends on the concatenated batches of N·b (SGD, mse).

    python _grad_train.py --backend local --ranks N OUT       # the reference: plain Keras
    mpirun -np N python _grad_train.py --backend mpi OUT      # or horovod under horovodrun,
    launch_mwms.sh ... (--backend tf: MultiWorkerMirroredStrategy from TF_CONFIG)
    python _grad_train.py --backend mirrored --ranks N OUT    # MirroredStrategy, N CPUs

Every rank builds the same global data and the same initial weights (set from NumPy, so
Keras 3 and tf_keras start alike). Step k's global batch is samples [k·N·b, (k+1)·N·b);
rank r trains on its r-th slice of b. With ``DistributedOptimizer`` averaging the
gradients the ranks take the reference's steps; summing them would take steps N times
as long. Writes, per rank, ``{"final": {compression: weights}, "initial": weights}`` to
OUT with ``{rank}`` replaced. ``--backend local`` imports nothing of forge_dist.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ap = argparse.ArgumentParser()
ap.add_argument("--backend", required=True, choices=["local", "mpi", "horovod", "tf", "mirrored"])
ap.add_argument("--ranks", type=int, default=None, help="local/mirrored: how many ranks")
ap.add_argument("--compression", action="append", default=None, choices=["none", "fp16"])
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--batch", type=int, default=8, help="samples per rank and step")
ap.add_argument("out")
args, _ = ap.parse_known_args()  # (launch_mwms.sh adds arguments of its own)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if args.backend == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.ranks
    )
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    import tf_keras as keras
else:
    import keras

strategy = None
if args.backend == "tf":
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=120)
    )
elif args.backend == "mirrored":
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.ranks)])

comm = None
if args.backend == "local":
    rank, size = 0, args.ranks
else:
    from forge_dist import get_communicator
    from forge_dist import keras as fk

    with strategy.scope() if strategy else contextlib.nullcontext():
        comm = get_communicator("tf" if strategy else args.backend)
    rank, size = comm.rank, comm.size

N = args.ranks or size
b, steps = args.batch, args.steps
rng = np.random.default_rng(2026)
x = rng.normal(size=(steps * N * b, 6)).astype("float32")
y = (np.sin(x @ rng.normal(size=(6, 1))) + 0.1 * rng.normal(size=(steps * N * b, 1))).astype(
    "float32"
)
initial = [
    rng.normal(scale=0.5, size=(6, 5)).astype("float32"),
    rng.normal(scale=0.1, size=(5,)).astype("float32"),
    rng.normal(scale=0.5, size=(5, 1)).astype("float32"),
    rng.normal(scale=0.1, size=(1,)).astype("float32"),
]


def shard(a: np.ndarray, r: int) -> np.ndarray:
    """Rank r's slice of every global batch, in order."""
    return a.reshape(steps, N, b, -1)[:, r].reshape(steps * b, -1)


def train(compression: str) -> list:
    def build():
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(1)]
        )
        opt = keras.optimizers.SGD(0.2)
        if comm is not None:
            opt = fk.DistributedOptimizer(opt, communicator=comm, compression=compression)
        model.compile(optimizer=opt, loss="mse")
        model.set_weights(initial)
        return model

    if strategy is None:
        model = build()
    else:
        with strategy.scope():
            model = build()
    fit = {"epochs": 1, "shuffle": False, "verbose": 0}
    if args.backend == "local" or args.backend == "mirrored":
        model.fit(x, y, batch_size=N * b, **fit)  # (the strategy splits each global batch)
    elif args.backend == "tf":
        # Each worker feeds its own slice of every global batch.
        def per_worker(ctx):
            r = ctx.input_pipeline_id
            ds = tf.data.Dataset.from_tensor_slices((shard(x, r), shard(y, r))).batch(b)
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.OFF
            )
            return ds.with_options(options)

        data = strategy.distribute_datasets_from_function(per_worker)
        model.fit(data, steps_per_epoch=steps, **fit)
    else:
        model.fit(shard(x, rank), shard(y, rank), batch_size=b, **fit)
    return [np.asarray(w).tolist() for w in model.get_weights()]


report = {
    "rank": rank,
    "size": strategy.num_replicas_in_sync if strategy is not None else size,
    "backend": comm.backend if comm is not None else "local",
    "initial": [w.tolist() for w in initial],
    "final": {c: train(c) for c in (args.compression or ["none"])},
}
with open(args.out.replace("{rank}", str(rank)), "w") as f:
    json.dump(report, f)
