"""``fit_resumed(shuffle=True)`` (Keras' default): every epoch in its own order, a
mid-epoch resume going on with the samples of that order it had not reached, each once,
and ending exactly where an uninterrupted shuffled run ends (in one process here; on
other rank counts in test_keras_reshard.py)."""

from __future__ import annotations

import collections
import os
import signal

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.keras import _compat  # noqa: E402
from forge_dist.preemption import Preempted  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402

N, BATCH = 96, 16  # 6 batches an epoch
RNG = np.random.default_rng(2)
FEATS = RNG.normal(size=(N, 4)).astype("float32")
X = np.concatenate([np.arange(N, dtype="float32")[:, None], FEATS], axis=1)  # column 0: id
Y = (FEATS @ np.array([[1.0], [-1.0], [0.5], [0.2]], dtype="float32")).astype("float32")
seen: dict[int, list[int]] = collections.defaultdict(list)
now = {"epoch": 0}


@keras.saving.register_keras_serializable(package="forge_dist_tests")
class Ids(keras.layers.Layer):
    """Strips column 0; records the ids each training batch brings (eagerly)."""

    def call(self, inputs, training=None):
        if training and not isinstance(inputs, keras.KerasTensor):
            seen[now["epoch"]].extend(np.asarray(inputs[:, 0]).astype(int).tolist())
        return inputs[:, 1:]

    def compute_output_shape(self, shape):
        return (shape[0], shape[1] - 1)


class Epoch(keras.callbacks.Callback):
    def __init__(self, signal_at=None):
        super().__init__()
        self.at = signal_at

    def on_epoch_begin(self, epoch, logs=None):
        now["epoch"] = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.at == (now["epoch"], batch):
            os.kill(os.getpid(), signal.SIGUSR1)


def make():
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [keras.Input((5,)), Ids(), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    model.run_eagerly = True
    return model


def run(root, model, restored=None, signal_at=None, **kw):
    cbs = fk.production_callbacks(
        str(root), communicator=LOCAL, verbose=0, preemption_check_every_n_batches=1
    )
    return fk.fit_resumed(
        model, restored, X, Y, epochs=4, batch_size=BATCH, verbose=0,
        callbacks=[Epoch(signal_at), *cbs], validation_split=0.25, **kw,
    )  # fmt: skip


def test_an_interrupted_shuffled_epoch_trains_each_sample_once_and_ends_as_uninterrupted(tmp_path):
    seen.clear()
    ref_model = make()
    ref = run(tmp_path / "ref", ref_model)
    ref_seen = {e: list(ids) for e, ids in seen.items()}
    train = int(N * 0.75)  # (validation_split takes the last quarter, as Keras does)
    for e in range(4):
        assert sorted(ref_seen[e]) == list(range(train))
    assert ref_seen[0] != sorted(ref_seen[0]) and ref_seen[0] != ref_seen[1]  # shuffled

    seen.clear()
    root = tmp_path / "root"
    with pytest.raises(Preempted):
        run(root, make(), signal_at=(2, 2))  # after batch 3 of epoch 3
    before = {e: list(ids) for e, ids in seen.items()}
    newest = CheckpointStore(str(root)).newest()
    assert newest.state["batch"] == 2 and isinstance(newest.state["data_seed"], int)

    seen.clear()
    model = make()
    restored = fk.restore_latest(model, str(root), communicator=LOCAL, verbose=0)
    history = run(root, model, restored)
    # Epoch 3, across the interruption: each sample once, in the uninterrupted order.
    assert before[2] + seen[2] == ref_seen[2]
    assert seen[3] == ref_seen[3]
    fingerprint = _compat.weights_fingerprint
    assert fingerprint(model.get_weights()) == fingerprint(ref_model.get_weights())
    assert history.history["val_loss"] == ref.history["val_loss"][3:]


def test_shuffle_false_keeps_the_arrays_order(tmp_path):
    seen.clear()
    run(tmp_path / "r", make(), shuffle=False)
    assert seen[0] == list(range(int(N * 0.75))) == seen[1]


def test_an_unordered_input_cannot_resume_mid_epoch_and_says_what_to_pass(tmp_path):
    gen = keras.utils.PyDataset  # any non-array input
    restored = fk.RestoreResult(True, 9, 0, 0, 2, world_size=1)

    class Batches(gen):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return X[i * BATCH : (i + 1) * BATCH], Y[i * BATCH : (i + 1) * BATCH]

    with pytest.raises(ConfigurationError, match="array inputs .* or shuffle=False"):
        fk.fit_resumed(make(), restored, Batches(), epochs=2, communicator=LOCAL)


# ------------------------------------------------------------------ tf.data inputs
tf = pytest.importorskip("tensorflow")
TRAIN = int(N * 0.75)


def pipeline(**shuffle):
    ds = tf.data.Dataset.from_tensor_slices((X[:TRAIN], Y[:TRAIN]))
    if shuffle:
        ds = ds.shuffle(TRAIN, **shuffle)
    return ds.map(lambda a, b: (a, b * 1.0)).batch(BATCH)


def run_ds(root, model, ds, restored=None, signal_at=None):
    cbs = fk.production_callbacks(
        str(root), communicator=LOCAL, verbose=0, preemption_check_every_n_batches=1
    )
    return fk.fit_resumed(model, restored, ds, epochs=4, verbose=0,
                          validation_data=(X[TRAIN:], Y[TRAIN:]),
                          callbacks=[Epoch(signal_at), *cbs])  # fmt: skip


def test_a_replayable_tf_data_pipeline_resumes_mid_epoch_exactly(tmp_path):
    make_ds = lambda: pipeline(seed=5, reshuffle_each_iteration=False)  # noqa: E731
    seen.clear()
    ref_model = make()
    run_ds(tmp_path / "ref", ref_model, make_ds())
    ref_seen = {e: list(ids) for e, ids in seen.items()}
    seen.clear()
    root = tmp_path / "root"
    with pytest.raises(Preempted):
        run_ds(root, make(), make_ds(), signal_at=(1, 3))
    before = {e: list(ids) for e, ids in seen.items()}
    seen.clear()
    model = make()
    restored = fk.restore_latest(model, str(root), communicator=LOCAL, verbose=0)
    run_ds(root, model, make_ds(), restored)
    assert before[1] + seen[1] == ref_seen[1]  # each sample of epoch 2 once, in order
    assert sorted(ref_seen[1]) == list(range(TRAIN))
    fingerprint = _compat.weights_fingerprint
    assert fingerprint(model.get_weights()) == fingerprint(ref_model.get_weights())


@pytest.mark.parametrize(
    "shuffle, words",
    [
        ({"seed": 5}, "shuffles anew each epoch"),
        ({"reshuffle_each_iteration": False}, "has no seed"),
    ],
)
def test_a_pipeline_that_cannot_be_replayed_is_refused_before_the_first_step(
    tmp_path, shuffle, words
):
    root = tmp_path / "root"
    with pytest.raises(Preempted):
        run_ds(root, make(), pipeline(seed=5, reshuffle_each_iteration=False), signal_at=(1, 3))
    model = make()
    restored = fk.restore_latest(model, str(root), communicator=LOCAL, verbose=0)
    seen.clear()
    tf.random.set_seed(None)  # (a global seed would seed an unseeded shuffle by op count)
    with pytest.raises(ConfigurationError, match=words) as info:
        run_ds(root, model, pipeline(**shuffle), restored)
    assert "reshuffle_each_iteration=False" in str(info.value) and not seen  # nothing ran


def test_a_non_deterministic_map_cannot_be_replayed():
    from forge_dist.keras.pipeline import replay_problem

    ds = tf.data.Dataset.range(8).map(lambda v: v, num_parallel_calls=2, deterministic=False)
    assert "deterministic=False" in replay_problem(ds)
    assert replay_problem(tf.data.Dataset.range(8).batch(2)) is None
