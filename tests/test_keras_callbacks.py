"""Callbacks in one process (Keras 3), and with simulated ranks where inputs differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.comm import LocalCommunicator  # noqa: E402
from forge_dist.errors import (  # noqa: E402
    BackendNotInstalledError,
    CollectiveMismatchError,
    ConfigurationError,
    StorageError,
)
from forge_dist.storage import CheckpointStore  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL = LocalCommunicator()
RNG = np.random.default_rng(0)
X = RNG.normal(size=(128, 4)).astype("float32")
Y = (X @ np.array([[1.0], [-1.0], [0.5], [0.0]], dtype="float32")).astype("float32")


def make_model(lr=0.05, distributed=False):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    opt = keras.optimizers.Adam(lr)
    if distributed:
        opt = fk.DistributedOptimizer(opt, communicator=LOCAL)
    model.compile(optimizer=opt, loss="mse", metrics=["mae"])
    return model


def fit(model, callbacks, epochs=3, initial_epoch=0):
    return model.fit(
        X,
        Y,
        validation_data=(X[:32], Y[:32]),
        epochs=epochs,
        batch_size=32,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        initial_epoch=initial_epoch,
    )


# ----------------------------------------------------------------- SyncMetrics (2 ranks)
def test_sync_metrics_means_values_in_sorted_order_and_weights_validation():
    def rank_fn(comm):
        cb = fk.SyncMetrics(communicator=comm, validation_samples=[10, 30][comm.rank])
        logs = {"loss": [1.0, 3.0][comm.rank], "val_loss": [1.0, 2.0][comm.rank], "note": "text"}
        cb.sync(logs, "test", weight_all=False)
        return logs

    r0, r1 = run_ranks(2, rank_fn)
    assert r0 == r1
    assert r0["loss"] == 2.0  # plain mean for training values
    assert r0["val_loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert r0["note"] == "text"


def test_sync_metrics_with_different_keys_is_an_error_on_every_rank():
    def rank_fn(comm):
        cb = fk.SyncMetrics(communicator=comm)
        logs = {"loss": 1.0, **({"val_loss": 2.0} if comm.rank == 0 else {"val_acc": 1.0})}
        cb.sync(logs, "epoch 0", weight_all=False)

    results = run_ranks(2, rank_fn)
    assert all(isinstance(e, CollectiveMismatchError) for e in results), results
    assert all("val_acc" in str(e) and "rank 1" in str(e) for e in results)


def test_a_decision_error_on_the_chief_reaches_every_rank():
    def rank_fn(comm):
        model = make_model()
        cb = fk.SyncEarlyStopping(monitor="val_los", mode="min", communicator=comm)
        cb.set_model(model)
        cb.on_train_begin()
        cb.on_epoch_end(0, {"val_loss": 1.0})

    results = run_ranks(2, rank_fn, timeout=30)
    assert all(isinstance(e, ConfigurationError) for e in results), results
    assert all("'val_los' is not in the logs" in str(e) for e in results)


# ----------------------------------------------------------------- one process
def test_unknown_monitor_fails_at_the_first_epoch_with_the_available_keys(tmp_path):
    with pytest.raises(ConfigurationError, match="available: .*val_loss"):
        fit(make_model(), [fk.SyncEarlyStopping(monitor="val_lss", mode="min", communicator=LOCAL)])


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: fk.SyncEarlyStopping(patience=-1, communicator=LOCAL), "patience"),
        (lambda: fk.SyncEarlyStopping(mode="best", communicator=LOCAL), "mode must be"),
        (lambda: fk.SyncEarlyStopping(monitor=3, communicator=LOCAL), "monitor"),
        (lambda: fk.SyncReduceLROnPlateau(factor=2.0, communicator=LOCAL), "factor"),
        (lambda: fk.SyncReduceLROnPlateau(cooldown=-1, communicator=LOCAL), "cooldown"),
        (lambda: fk.ChiefModelCheckpoint("/tmp/x", save_freq=0, communicator=LOCAL), "save_freq"),
        (lambda: fk.ChiefModelCheckpoint("/tmp/x", keep_last=0, communicator=LOCAL), "keep_last"),
        (lambda: fk.ConsistencyGuard(on_mismatch="ignore", communicator=LOCAL), "on_mismatch"),
        (lambda: fk.BroadcastInitialState(root=3, communicator=LOCAL), "root"),
        (lambda: fk.ChiefCSVLogger("", communicator=LOCAL), "url"),
    ],
)
def test_bad_arguments_fail_at_construction(factory, message):
    with pytest.raises(ConfigurationError, match=message):
        factory()


def test_a_missing_storage_backend_fails_at_construction():
    with pytest.raises(BackendNotInstalledError, match=r"forge-dist\[gcs\]"):
        fk.ChiefModelCheckpoint("gs://bucket/run", communicator=LOCAL)


def test_checkpoints_load_with_plain_keras_and_carry_callback_state(tmp_path):
    root = str(tmp_path / "ckpt")
    model = make_model(distributed=True)
    es = fk.SyncEarlyStopping(patience=5, communicator=LOCAL)
    cb = fk.ChiefModelCheckpoint(root, keep_last=2, communicator=LOCAL)
    history = fit(model, [fk.SyncMetrics(communicator=LOCAL), es, cb], epochs=3)
    store = CheckpointStore(root)
    assert store.steps() == [8, 12]  # 4 batches per epoch; the first step was retained out
    info = store.newest(verify="full")
    assert info.state["epoch"] == 2 and info.state["step"] == 12
    assert info.state["callbacks"]["early_stopping"]["best"] == pytest.approx(es.best)
    # The manifest carries the logs of the epoch it saved.
    assert info.metrics["val_loss"] == pytest.approx(history.history["val_loss"][-1])
    assert info.metrics["loss"] == pytest.approx(history.history["loss"][-1])
    dest = store.download(None, tmp_path / "dl")
    loaded = keras.models.load_model(os.path.join(dest, "model.keras"))
    assert type(loaded.optimizer).__name__ == "Adam"
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_weights_only_and_best_only(tmp_path):
    root = str(tmp_path / "w")
    model = make_model()
    cb = fk.ChiefModelCheckpoint(
        root, save_weights_only=True, save_best_only=True, communicator=LOCAL
    )
    fit(model, [cb], epochs=3)
    store = CheckpointStore(root)
    assert [e.path for e in store.newest().manifest.files] == ["model.weights.h5"]
    fresh = make_model()
    restored = fk.restore_latest(fresh, root, communicator=LOCAL)
    assert restored.restored and restored.initial_epoch == store.newest().state["epoch"] + 1
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Keras 3 weight files carry the optimizer's variables too: they come back.
    iterations = [v for v in fresh.optimizer.variables if "iteration" in v.name]
    assert int(iterations[0].numpy()) == store.newest().state["step"]


def test_restore_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    root = tmp_path / "r"
    model = make_model()
    fit(model, [fk.ChiefModelCheckpoint(str(root), communicator=LOCAL)], epochs=2)
    newest = root / "step-00000008" / "model.keras"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    fresh = make_model()
    with caplog.at_level("WARNING"):
        r = fk.restore_latest(fresh, str(root), communicator=LOCAL)
    assert r.step == 4 and r.skipped == ["step-00000008"] and r.initial_epoch == 1
    assert any("step-00000008" in m for m in caplog.messages)


def test_restore_with_nothing_saved_is_a_fresh_start(tmp_path):
    r = fk.restore_latest(make_model(), str(tmp_path / "none"), communicator=LOCAL)
    assert not r.restored and r.initial_epoch == 0


def test_a_failed_save_is_an_error_not_a_silent_skip(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="not a directory"):
        fit(make_model(), [fk.ChiefModelCheckpoint(str(blocker), communicator=LOCAL)], epochs=1)


def test_plateau_sets_and_logs_the_learning_rate(tmp_path):
    model = make_model(lr=0.05)
    cb = fk.SyncReduceLROnPlateau(
        monitor="loss", patience=0, factor=0.5, min_delta=10.0, communicator=LOCAL
    )
    h = fit(model, [cb], epochs=3)
    # Epoch 0 sets the first "best"; every later epoch misses it by min_delta and, with
    # patience 0, halves the rate (Keras' semantics).
    assert h.history["learning_rate"] == pytest.approx([0.05, 0.025, 0.0125])


def test_csv_logger_appends_without_duplicating_epochs(tmp_path):
    url = str(tmp_path / "log" / "history.csv")
    model = make_model()
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=3)
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=4, initial_epoch=2)
    with open(url) as f:
        lines = f.read().splitlines()
    assert lines[0].split(",")[0] == "epoch"
    assert [ln.split(",")[0] for ln in lines[1:]] == ["0", "1", "2", "3"]


def test_csv_logger_writes_to_object_storage(s3):
    url = f"s3://{s3.bucket}/csv/history.csv"
    opts = {k: v for k, v in s3.options.items() if k != "skip_instance_cache"}
    fit(make_model(), [fk.ChiefCSVLogger(url, storage_options=opts, communicator=LOCAL)], epochs=2)
    import fsspec

    text = fsspec.open(url, "r", **opts).open().read()
    assert text.count("\n") == 3


def test_distributed_optimizer_refuses_double_wrapping():
    opt = fk.DistributedOptimizer(keras.optimizers.SGD(0.1), communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="already"):
        fk.DistributedOptimizer(opt, communicator=LOCAL)


@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_mirrored_strategy_over_two_logical_cpus(tmp_path, flavor):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if flavor == "tf_keras":
        env["TF_USE_LEGACY_KERAS"] = "1"
    root = str(tmp_path / "m")
    script = os.path.join(HERE, "_mirrored_train.py")
    runs = []
    for _ in range(2):  # train, then resume: nothing left to do, same weights
        out = subprocess.run(
            [sys.executable, script, root], env=env, capture_output=True, text=True, timeout=240
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["backend"] == "tf" and first["replicas"] == 2 and first["flavor"] == flavor
    assert first["epochs"] == 3
    assert second["initial_epoch"] == 3 and second["fingerprint"] == first["fingerprint"]
    forge = os.path.join(os.path.dirname(sys.executable), "forge-dist")
    assert subprocess.run([forge, "verify", root, "--all"], timeout=60).returncode == 0


def test_save_freq_in_batches(tmp_path):
    root = str(tmp_path / "b")
    model = make_model()
    cb = fk.ChiefModelCheckpoint(root, save_freq=3, communicator=LOCAL)
    fit(model, [cb], epochs=2)  # 4 batches per epoch: saves after batches 3 and 6
    store = CheckpointStore(root)
    assert store.steps() == [3, 6]
    assert store.get(3).state["epoch_done"] is False and store.get(3).state["epoch"] == 0
    assert store.get(6).state["epoch"] == 1


@pytest.mark.parametrize("on_mismatch", ["raise", "warn", "repair"])
def test_consistency_guard_catches_a_silent_desync(on_mismatch):
    def rank_fn(comm):
        keras.utils.set_random_seed(comm.rank)  # a desync: different weights per rank
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        guard = fk.ConsistencyGuard(on_mismatch=on_mismatch, communicator=comm)
        guard.set_model(model)
        guard.on_epoch_end(0, {})
        return guard.mismatches, fk._compat.weights_fingerprint(model.get_weights())

    results = run_ranks(2, rank_fn, timeout=30)
    if on_mismatch == "raise":
        assert all(isinstance(e, CollectiveMismatchError) for e in results), results
        assert all("rank(s) 1" in str(e) for e in results)
        return
    (m0, f0), (m1, f1) = results
    assert m0 == m1 == 1
    assert (f0 == f1) == (on_mismatch == "repair")
