"""Resuming on a different number of ranks: ``fit_resumed(shard=True)`` keeps a
mid-epoch position as a global sample offset.

Under ``mpirun``, runs at one rank count are preempted mid-epoch and resumed at another
(2→1, 1→2, 2→4); every rank records the ids of the samples that reached the model in
training steps, and every epoch, across the interruption, must hold every sample
exactly once; and the resumed weights must equal, bit for bit after every epoch, an
uninterrupted run at the new count from the resume point: plain Keras on every rank
loading the checkpoint's ``model.keras`` and training on from the same sample.
"""

from __future__ import annotations

import collections
import os
import shutil

import pytest

pytest.importorskip("tensorflow")

import numpy as np  # noqa: E402
from kerashelp import LOCAL, X, Y, keras  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.keras import _compat  # noqa: E402
from forge_dist.preemption import PREEMPTED_EXIT_CODE  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "_reshard_train.py")
SAMPLES, BATCH, EPOCHS = 200, 8, 3


def _model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


# ------------------------------------------------------------------- one process
@pytest.mark.keras
def test_shard_on_one_rank_is_a_plain_fit():
    plain, sharded = _model(), _model()
    plain.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    fk.fit_resumed(sharded, None, X, Y, batch_size=16, epochs=2, shard=True, communicator=LOCAL,
                   shuffle=False, verbose=0)  # fmt: skip
    fingerprint = _compat.weights_fingerprint
    assert fingerprint(sharded.get_weights()) == fingerprint(plain.get_weights())


def _pipeline(**shuffle):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((X, Y))
    if shuffle:
        ds = ds.shuffle(len(X), **shuffle)
    return ds.map(lambda a, b: (a, b * 1.0)).batch(16)


@pytest.mark.keras
def test_a_sharded_pipeline_on_one_rank_is_a_plain_fit_on_it():
    plain, sharded = _model(), _model()
    pipeline = _pipeline(seed=3, reshuffle_each_iteration=False)
    plain.fit(pipeline, epochs=2, verbose=0)
    fk.fit_resumed(sharded, None, pipeline, epochs=2, shard=True, communicator=LOCAL, verbose=0)
    fingerprint = _compat.weights_fingerprint
    assert fingerprint(sharded.get_weights()) == fingerprint(plain.get_weights())


@pytest.mark.keras
def test_ranks_cut_a_pipeline_as_they_cut_arrays():
    """Each rank's batches of one stream: every sample once, laid out as shard_rows
    lays out arrays (a short last global batch in pieces, the first ranks one longer)."""
    import tensorflow as tf

    from forge_dist.keras.pipeline import rank_batches
    from forge_dist.policy import shard_rows

    samples = tf.data.Dataset.range(45)
    for offset in (0, 6):  # (45 and 39 samples: short last global batches of 9 and 3)
        for r in range(3):
            got = [b.numpy().tolist() for b in rank_batches(samples, 45, offset, 4, r, 3)]
            assert got == [list(rows) for rows in shard_rows(45, offset, 4, 3, r)]


@pytest.mark.keras
def test_a_pipeline_each_process_shuffles_its_own_way_cannot_be_sharded():
    import tensorflow as tf

    model = _model()
    tf.random.set_seed(None)  # (a global seed would seed an unseeded shuffle by op count)
    with pytest.raises(ConfigurationError, match="shuffle has no seed") as info:
        fk.fit_resumed(model, None, _pipeline(reshuffle_each_iteration=False), shard=True,
                       communicator=LOCAL, verbose=0)  # fmt: skip
    assert "Seed its shuffle" in str(info.value)


@pytest.mark.keras
def test_ranks_that_pass_different_pipelines_fail_together():
    import tensorflow as tf
    from threadcomm import run_ranks

    def rank(comm):
        ds = tf.data.Dataset.from_tensor_slices((X + comm.rank, Y)).batch(16)
        with pytest.raises(ConfigurationError, match="rank\\(s\\) 1 read other samples"):
            fk.fit_resumed(_model(), None, ds, shard=True, communicator=comm, verbose=0)
        return True

    assert run_ranks(2, rank) == [True, True]


@pytest.mark.keras
@pytest.mark.parametrize(
    "restored, shard, match",
    [
        # saved by a shard=True run: its position is a sample offset, not each rank's batch
        (fk.RestoreResult(True, 9, 0, 0, 2, initial_sample=32, world_size=2), False,
         "trained with shard=True"),
        # saved by ranks on their own data: no global offset to continue from
        (fk.RestoreResult(True, 9, 0, 0, 2, world_size=1), True, "each trained on their own"),
        # each rank's own data, saved by 2 ranks, resumed on 1
        (fk.RestoreResult(True, 9, 0, 0, 2, world_size=2), False,
         "by 2 rank\\(s\\), each on its own data, and this job has 1"),
    ],
)  # fmt: skip
def test_a_mid_epoch_position_carries_over_only_the_way_it_was_saved(restored, shard, match):
    model = _model()
    before = _compat.weights_fingerprint(model.get_weights())
    with pytest.raises(ConfigurationError, match=match):
        fk.fit_resumed(model, restored, X, Y, batch_size=16, epochs=2, shard=shard,
                       communicator=LOCAL)  # fmt: skip
    assert _compat.weights_fingerprint(model.get_weights()) == before  # nothing trained


@pytest.mark.keras
@pytest.mark.parametrize("shard", [False, True])
def test_a_checkpoint_after_the_epochs_last_batch_goes_on_with_the_next_epoch(shard, capsys):
    # save_freq=N can land on the last batch (128 samples = 8 batches of 16).
    restored = fk.RestoreResult(True, 8, 0, 0, 8, initial_sample=128 if shard else None,
                                world_size=1)  # fmt: skip
    seen = []

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    fk.fit_resumed(_model(), restored, X, Y, batch_size=16, epochs=3, shard=shard,
                   communicator=LOCAL, callbacks=[Epochs()], verbose=0)  # fmt: skip
    assert seen == [1, 2]
    assert "saved after the last batch of epoch 1: going on with epoch 2" in capsys.readouterr().out


@pytest.mark.keras
def test_shard_refuses_inputs_it_cannot_split():
    model = _model()
    with pytest.raises(ConfigurationError, match="different numbers of samples"):
        fk.fit_resumed(model, None, X, Y[:-1], batch_size=16, shard=True, communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="array inputs"):
        fk.fit_resumed(model, None, list(X.tolist()), Y, shard=True, communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="leave steps_per_epoch out"):
        fk.fit_resumed(model, None, X, Y, shard=True, steps_per_epoch=2, communicator=LOCAL)


@pytest.mark.keras
def test_shard_refuses_an_epoch_that_leaves_a_rank_without_samples():
    from threadcomm import run_ranks

    x, y = np.zeros((33, 4), "float32"), np.zeros((33, 1), "float32")  # 32 + 1 for 2 ranks

    def rank(comm):
        with pytest.raises(ConfigurationError, match="1 sample\\(s\\) for 2 ranks"):
            fk.fit_resumed(_model(), None, x, y, batch_size=16, shard=True, communicator=comm)
        return True

    assert run_ranks(2, rank) == [True, True]


@pytest.mark.keras
def test_ranks_that_pass_different_data_fail_together():
    from threadcomm import run_ranks

    def rank(comm):
        x = X + comm.rank  # each rank its own shard: not what shard=True means
        with pytest.raises(ConfigurationError, match="rank\\(s\\) 1 passed other data"):
            fk.fit_resumed(_model(), None, x, Y, batch_size=16, shard=True, communicator=comm)
        return True

    assert run_ranks(2, rank) == [True, True]


@pytest.mark.keras
def test_ranks_that_would_run_different_fits_fail_together_at_once():
    from threadcomm import run_ranks

    def rank(comm, extra_on_rank_1=True, epochs=(2, 2)):
        cbs = [fk.SyncMetrics(communicator=comm)]
        if extra_on_rank_1 and comm.rank == 1:
            cbs.append(fk.SyncTerminateOnNaN(communicator=comm))
        model = _model()
        with pytest.raises(ConfigurationError, match="rank 1's (callbacks|settings) differ"):
            fk.fit_resumed(model, None, X, Y, batch_size=16, epochs=epochs[comm.rank],
                           callbacks=cbs, verbose=0)  # fmt: skip
        assert int(model.optimizer.iterations.numpy()) == 0  # nothing trained
        return True

    assert run_ranks(2, rank) == [True, True]
    assert run_ranks(2, lambda c: rank(c, extra_on_rank_1=False, epochs=(2, 3))) == [True] * 2


# ------------------------------------------------------------------- mpirun
@pytest.mark.mpi
@pytest.mark.slow
def test_under_mpirun_one_rank_with_its_own_extra_callback_ends_every_rank_at_once(tmp_path):
    """The mistake of a rank-dependent ``extra=[...]``: each rank's collectives would
    wait for the others' in different places until the deadline (600 s; the run is
    bounded at 240 s); instead every rank fails before the first step, saying why."""
    run = _run(2, tmp_path / "root", tmp_path / "r{rank}.json", "--last-rank-alert")
    assert run.returncode != 0
    assert run.output.count("every rank must run the same fit") >= 2, run.output[-3000:]
    assert "rank 1's callbacks differ from rank 0's" in run.output
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())


def _run(ranks, root, out, *extra):
    from multiproc import mpirun

    args = [TRAIN, "--root", str(root), "--out", str(out), "--samples", str(SAMPLES)]
    args += ["--batch-size", str(BATCH), "--epochs", str(EPOCHS), *extra]
    return mpirun(ranks, args, bound_s=240)


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize(
    "before, after, data",
    # Every change of rank count and every kind of data, each at least once: shuffled
    # arrays at the same and at more ranks, tf.data at fewer and at more.
    [(2, 1, "arrays"), (2, 4, "arrays"), (2, 2, "shuffled"), (1, 2, "shuffled"),
     (2, 1, "tf.data"), (1, 2, "tf.data")],
)  # fmt: skip
def test_a_mid_epoch_resume_on_another_rank_count_trains_every_sample_once(
    tmp_path, before, after, data
):
    """With shuffle=True every epoch has its own order (from the seed each checkpoint
    records): the resumed epoch goes on with the samples of that order not reached. A
    tf.data pipeline (a seeded shuffle, a map, batched) is one stream of samples, the
    same on every rank, cut into global batches like the arrays."""
    from multiproc import read_rank_reports

    root = tmp_path / "root"
    shuffle = data == "shuffled"
    order = {"arrays": [], "shuffled": ["--shuffle"], "tf.data": ["--tf-data"]}[data]
    # The last rank signals itself after batch 3 of epoch 1: every rank saves once, exits 75.
    run = _run(before, root, tmp_path / "a{rank}.json", "--signal-at", "1:3",
               "--signal-rank", str(before - 1), *order)  # fmt: skip
    assert run.returncode == PREEMPTED_EXIT_CODE, run.output[-3000:]
    first = read_rank_reports(str(tmp_path / "a{rank}.json"), ranks=before)
    step = first[0]["preempted"]["step"]
    assert {r["preempted"]["step"] for r in first} == {step}
    shutil.copytree(root, tmp_path / "saved")  # the checkpoint as the resume found it

    run = _run(after, root, tmp_path / "b{rank}.json", "--resume", *order)
    assert run.returncode == 0, run.output[-3000:]
    offset = (3 + 1) * BATCH * before  # 4 steps at `before` ranks
    assert f"epoch 2 at sample {offset}" in run.output  # what the chief says it restored
    second = read_rank_reports(str(tmp_path / "b{rank}.json"), ranks=after)
    for r in second:
        assert r["resumed"] == {"step": step, "epoch": 1, "sample": offset, "world_size": before}
    # Every epoch, across the interruption and both rank counts: each sample once.
    for epoch in map(str, range(EPOCHS)):
        seen = collections.Counter(i for r in first + second for i in r["ids"].get(epoch, []))
        assert sorted(seen) == list(range(SAMPLES)), f"epoch {epoch}: samples missing"
        assert set(seen.values()) == {1}, f"epoch {epoch}: samples trained twice"
    ids0, ids2 = first[0]["ids"]["0"], second[0]["ids"]["2"]
    if data != "arrays":  # really shuffled: not the arrays' order
        assert ids0 != sorted(ids0)
    if shuffle:  # and another order each epoch
        assert ids0[:8] != ids2[:8]
    # The new rank count agrees on everything (the epoch losses are SyncMetrics' means).
    for r in second[1:]:
        for key in ("fingerprints", "lrs", "loss", "mae", "fingerprint"):
            assert r[key] == second[0][key], f"rank {r['rank']}'s {key} differ"
    # An uninterrupted run at the new count from the resume point: plain Keras loading
    # the step's file on every rank and training on from the same sample, its data cut
    # by the reference's own code. Same weights after every epoch, bit for bit.
    store = CheckpointStore(str(tmp_path / "saved"))
    step_dir = os.path.join(str(tmp_path / "saved"), store.get(step).name)
    run = _run(after, "-", tmp_path / "p{rank}.json", "--mode", "plain", "--from", step_dir,
               "--offset", str(offset), "--epoch", "1", *order)  # fmt: skip
    assert run.returncode == 0, run.output[-3000:]
    plain = read_rank_reports(str(tmp_path / "p{rank}.json"), ranks=after)
    for mine, ref in zip(second, plain, strict=True):
        assert mine["fingerprints"] == ref["fingerprints"], f"rank {mine['rank']}"
    # The interrupted epoch's training loss and compiled metric (mae) are the whole
    # epoch's: the first ranks' sums over their samples (Keras weighs a batch by its
    # samples), shared among the new ranks, joined with each new rank's own; SyncMetrics
    # then averages the ranks.
    for name in ("loss", "mae"):
        done = sum(r[f"running_{name}"]["1"] * offset / before for r in first)
        rest = [(p[name]["1"], p["rest_samples"]) for p in plain]
        whole = np.mean([(done / after + v * k) / (offset / after + k) for v, k in rest])
        assert second[0][name]["1"] == pytest.approx(whole, rel=1e-5), name
        only_rest = np.mean([v for v, _ in rest])
        assert second[0][name]["1"] != pytest.approx(only_rest, rel=1e-3), name
