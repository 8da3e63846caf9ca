"""Training program for the resume-on-another-rank-count tests (``mpirun -np N``).

Every rank holds the whole dataset and trains with ``fit_resumed(shard=True)``. Column 0
of ``x`` is each sample's id; the model's first layer strips it, and, in training steps
only, records the ids that reached the model (the model runs eagerly), so a test sees
exactly which samples every rank trained on. ``--signal-at E:B`` makes ``--signal-rank``
send itself SIGUSR1 after batch B of epoch E: every rank saves once and exits 75.
``--tf-data`` passes a tf.data pipeline instead of the arrays.
``--mode plain --from STEPDIR --offset O --epoch E`` is the reference: every rank loads
the step's ``model.keras`` with Keras, takes its part of the data by its own reading of
the layout, and trains on from sample O of epoch E with plain ``model.fit`` (gradients
averaged by ``DistributedOptimizer`` when there are several ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["forge", "plain"], default="forge")
ap.add_argument("--root", required=True)
ap.add_argument("--out", required=True, help="report path; {rank} is replaced")
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--samples", type=int, default=200)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--signal-at", default=None, metavar="E:B")
ap.add_argument("--signal-rank", type=int, default=0)
ap.add_argument("--resume", action="store_true")
ap.add_argument(
    "--last-rank-alert",
    action="store_true",
    help="(a mistake) only the last rank passes its own alert callback in extra=[...]",
)
ap.add_argument("--from", dest="step_dir", default=None)
ap.add_argument("--offset", type=int, default=0)
ap.add_argument("--epoch", type=int, default=0)
ap.add_argument("--shuffle", action="store_true", help="fit_resumed(shuffle=True)")
ap.add_argument(
    "--tf-data",
    action="store_true",
    help="the data as a tf.data pipeline (seeded shuffle, map, batch), the same on every rank",
)
args = ap.parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.experimental.enable_op_determinism()

from forge_dist.keras import _compat  # noqa: E402

keras = _compat.keras
seen: dict[int, list[int]] = {}
current = {"epoch": 0}


@keras.saving.register_keras_serializable(package="forge_dist_tests")
class SampleIds(keras.layers.Layer):
    """Strips column 0 (the sample id); records the ids of every training batch."""

    def call(self, inputs, training=None):
        if training and not isinstance(inputs, keras.KerasTensor):
            ids = np.asarray(inputs[:, 0]).astype(np.int64).tolist()
            seen.setdefault(current["epoch"], []).extend(ids)
        return inputs[:, 1:]

    def compute_output_shape(self, shape):
        return (shape[0], shape[1] - 1)


class EpochOf(keras.callbacks.Callback):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def on_epoch_begin(self, epoch, logs=None):
        current["epoch"] = epoch

    def on_train_batch_end(self, batch, logs=None):
        # Keras' running mean of this rank's epoch so far, and the samples behind it.
        for name in ("loss", "mae"):  # the loss, and a compiled metric
            self.record[f"running_{name}"][str(current["epoch"])] = float(logs[name])

    def on_epoch_end(self, epoch, logs=None):
        self.record["fingerprints"][str(epoch)] = _compat.weights_fingerprint(
            self.model.get_weights()
        )
        self.record["lrs"][str(epoch)] = float(_compat.get_lr(self.model.optimizer))
        for name in ("loss", "mae"):
            self.record[name][str(epoch)] = float(logs[name])


def dataset(n: int) -> tuple:
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(n, 8)).astype("float32")
    y = np.tanh(feats @ np.linspace(-1, 1, 8).astype("float32"))[:, None]
    ids = np.arange(n, dtype="float32")[:, None]
    return np.concatenate([ids, feats], axis=1), y.astype("float32")


x, y = dataset(args.samples)
xv, yv = x[:64], y[:64]


def pipeline():
    """The user's pipeline: shuffled once with a seed (the same order every epoch, so an
    epoch can be replayed), a deterministic map, batched. A shuffle's order follows the
    global seed too, which build() sets per rank: the same one here on every rank."""
    tf.random.set_seed(1)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=3, reshuffle_each_iteration=False)
    return ds.map(lambda a, b: (a, b * 1.0)).batch(args.batch_size)


def stream_order() -> np.ndarray:
    """The sample indices in the order the pipeline yields them (read from tf.data)."""
    return np.asarray([int(a[0]) for a, _ in pipeline().unbatch().as_numpy_iterator()])


def report(rank: int, record: dict) -> None:
    record["ids"] = {str(e): ids for e, ids in seen.items()}
    with open(args.out.replace("{rank}", str(rank)), "w") as f:
        json.dump(record, f)


def build(rank_seed: int):
    keras.utils.set_random_seed(rank_seed)
    return keras.Sequential(
        [
            keras.Input((9,)),
            SampleIds(),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def my_part(n: int, offset: int, rank: int, size: int) -> np.ndarray:
    """The reference's own reading of the layout: in order, global batches of
    batch_size x size, rank r the r-th batch_size of each; a short last one in
    contiguous pieces, the first (rest % size) ranks one longer."""
    b, rows, start = args.batch_size, [], offset
    while n - start >= b * size:
        rows.extend(range(start + rank * b, start + (rank + 1) * b))
        start += b * size
    rest = n - start
    lengths = [rest // size + (1 if r < rest % size else 0) for r in range(size)]
    first = start + sum(lengths[:rank])
    rows.extend(range(first, first + lengths[rank]))
    return np.asarray(rows, dtype=np.int64)


if args.mode == "plain":
    # No restore_latest, no fit_resumed, no shard=: Keras loads the step's file; with
    # several ranks gradients are averaged by DistributedOptimizer and nothing else.
    from forge_dist.comm import get_communicator

    comm = get_communicator("auto")
    rank, size = comm.rank, comm.size
    loaded = keras.models.load_model(os.path.join(args.step_dir, "model.keras"))
    if size == 1:
        model = loaded
    else:
        from forge_dist import keras as fk

        model = build(0)
        opt = fk.DistributedOptimizer(keras.optimizers.Adam(0.01), communicator=comm)
        model.compile(optimizer=opt, loss="mse", metrics=["mae"])
        model.set_weights(loaded.get_weights())
        model.optimizer.build(model.trainable_variables)
        for mine, saved in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
            mine.assign(saved)
    model.run_eagerly = True
    record = {"rank": rank, "size": size, "fingerprints": {}, "lrs": {}, "loss": {}, "mae": {}}
    record["running_loss"], record["running_mae"] = {}, {}
    common = dict(batch_size=args.batch_size, shuffle=False, verbose=0)
    cbs = [EpochOf(record)]
    rest, whole = my_part(len(x), args.offset, rank, size), my_part(len(x), 0, rank, size)
    record["rest_samples"] = len(rest)
    if args.shuffle:
        # Each epoch in the order its seed gives (the seed the checkpoint recorded):
        # TensorFlow's stateless shuffle of the sample indices, as documented.
        with open(os.path.join(args.step_dir, "manifest.json")) as f:
            data_seed = json.load(f)["state"]["data_seed"]

        def order(epoch):
            seed = tf.constant([data_seed, epoch], tf.int64)
            return tf.random.experimental.stateless_shuffle(
                tf.range(len(x), dtype=tf.int64), seed=seed
            ).numpy()

        first = order(args.epoch)[rest]
        model.fit(x[first], y[first], epochs=args.epoch + 1, initial_epoch=args.epoch,
                  callbacks=cbs, **common)  # fmt: skip
        for epoch in range(args.epoch + 1, args.epochs):
            rows = order(epoch)[whole]
            model.fit(x[rows], y[rows], epochs=epoch + 1, initial_epoch=epoch,
                      callbacks=cbs, **common)  # fmt: skip
    elif args.tf_data:  # the pipeline's order, cut by the reference's reading
        perm = stream_order()
        assert sorted(perm.tolist()) == list(range(len(x))) and perm.tolist() != sorted(perm)
        first, rows = perm[rest], perm[whole]
        model.fit(x[first], y[first], epochs=args.epoch + 1, initial_epoch=args.epoch,
                  callbacks=cbs, **common)  # fmt: skip
        model.fit(x[rows], y[rows], epochs=args.epochs, initial_epoch=args.epoch + 1,
                  callbacks=cbs, **common)  # fmt: skip
    else:
        model.fit(x[rest], y[rest], epochs=args.epoch + 1, initial_epoch=args.epoch,
                  callbacks=cbs, **common)  # fmt: skip
        model.fit(x[whole], y[whole], epochs=args.epochs, initial_epoch=args.epoch + 1,
                  callbacks=cbs, **common)  # fmt: skip
    record["fingerprint"] = _compat.weights_fingerprint(model.get_weights())
    report(rank, record)
    sys.exit(0)

from forge_dist import keras as fk  # noqa: E402
from forge_dist.comm import get_communicator  # noqa: E402
from forge_dist.preemption import Preempted  # noqa: E402

comm = get_communicator("auto")
rank, size = comm.rank, comm.size
model = build(11 + rank)  # the chief's initial weights are broadcast
opt = fk.DistributedOptimizer(keras.optimizers.Adam(0.01))
model.compile(optimizer=opt, loss="mse", metrics=["mae"])
model.run_eagerly = True
record = {"rank": rank, "size": size, "fingerprints": {}, "lrs": {}, "loss": {}, "mae": {}}
record["running_loss"], record["running_mae"] = {}, {}
restored = fk.restore_latest(model, args.root, communicator=comm) if args.resume else None
if restored is not None:
    record["resumed"] = {
        "step": restored.step,
        "epoch": restored.initial_epoch,
        "sample": restored.initial_sample,
        "world_size": restored.world_size,
    }
mine = [EpochOf(record)]  # every rank's own (extra=[...] would run them on the chief only)
if args.signal_at and rank == args.signal_rank:
    at_epoch, at_batch = map(int, args.signal_at.split(":"))

    class SignalAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if current["epoch"] == at_epoch and batch == at_batch:
                os.kill(os.getpid(), signal.SIGUSR1)

    mine.append(SignalAt())
alert = [EpochOf({})] if args.last_rank_alert and rank == size - 1 else []
callbacks = fk.production_callbacks(
    args.root,
    extra=alert,
    monitor="val_loss",
    patience=100,
    reduce_lr_patience=None,
    keep_last=None,
    keep_best=None,
    preemption_check_every_n_batches=1,
    communicator=comm,
    verbose=0,
)
callbacks[-1:-1] = mine  # before PreemptionCheckpoint, which is last
code = 0
try:
    data = (pipeline(), None) if args.tf_data else (x, y)
    fk.fit_resumed(
        model,
        restored,
        *data,
        validation_data=(xv, yv),
        epochs=args.epochs,
        batch_size=None if args.tf_data else args.batch_size,  # (the pipeline's own)
        callbacks=callbacks,
        shard=True,
        shuffle=args.shuffle,
        verbose=0,
    )
except Preempted as stop:
    record["preempted"] = {"step": stop.step, "epoch": stop.epoch, "batch": stop.batch}
    code = int(stop.code)
record["fingerprint"] = _compat.weights_fingerprint(model.get_weights())
report(rank, record)
sys.exit(code)
