"""Keras' names and habits: filepath/filename, templates refused with what to pass, a
mode that contradicts the metric, plain Keras callbacks in a distributed fit, epochs
counted from 1, a resume that says what it restored."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, Steps, X, Y, fit, make_model  # noqa: E402
from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402


def test_filepath_is_kerass_name_for_the_root(tmp_path):
    cb = fk.ChiefModelCheckpoint(filepath=str(tmp_path / "run"), communicator=LOCAL)
    assert cb.directory == str(tmp_path / "run")


@pytest.mark.parametrize(
    "path", ["model-{epoch:02d}-{val_loss:.2f}.keras", "best.keras", "m.h5", "s3://b/m.keras"]
)
def test_a_keras_file_name_or_template_is_a_keras_file_path(path):
    cb = fk.ChiefModelCheckpoint(path, communicator=LOCAL)
    assert cb.filepath == path and cb.store is None


def test_a_mode_that_contradicts_the_metric_is_a_warning(tmp_path, capsys):
    model = make_model()
    model.compile(optimizer="adam", loss="mse", metrics=["accuracy"])
    es = fk.SyncEarlyStopping(monitor="val_accuracy", mode="min", communicator=LOCAL)
    fit(model, [es], epochs=1)
    out = capsys.readouterr().out
    assert "'val_accuracy' is normally maximised" in out and "mode='auto'" in out


#: Keras' own callbacks that go wrong on every rank, built as a tutorial builds them,
#: and the replacement the refusal must name.
KERAS_REFUSED = {
    "EarlyStopping": (
        lambda d: keras.callbacks.EarlyStopping(patience=2),
        "forge_dist.keras.SyncEarlyStopping",
    ),
    "ReduceLROnPlateau": (
        lambda d: keras.callbacks.ReduceLROnPlateau(),
        "forge_dist.keras.SyncReduceLROnPlateau",
    ),
    "ModelCheckpoint": (
        lambda d: keras.callbacks.ModelCheckpoint(str(d / "best.keras"), save_best_only=True),
        "forge_dist.keras.ChiefModelCheckpoint",
    ),
    "BackupAndRestore": (
        lambda d: keras.callbacks.BackupAndRestore(str(d / "backup")),
        "forge_dist.keras.BackupAndRestore",
    ),
    "CSVLogger": (
        lambda d: keras.callbacks.CSVLogger(str(d / "log.csv")),
        "forge_dist.keras.ChiefCSVLogger",
    ),
    "TensorBoard": (
        lambda d: keras.callbacks.TensorBoard(str(d / "tb")),
        "forge_dist.keras.ChiefTensorBoard",
    ),
    "TerminateOnNaN": (
        lambda d: keras.callbacks.TerminateOnNaN(),
        "forge_dist.keras.SyncTerminateOnNaN",
    ),
}


@pytest.mark.parametrize("name", sorted(KERAS_REFUSED))
def test_fit_resumed_refuses_kerass_callback_on_every_rank_naming_the_replacement(tmp_path, name):
    make, replacement = KERAS_REFUSED[name]
    steps = [Steps(), Steps()]

    def rank_fn(comm):
        callbacks = [fk.SyncMetrics(communicator=comm), make(tmp_path / str(comm.rank))]
        fk.fit_resumed(
            make_model(), None, X, Y, epochs=1, verbose=0, callbacks=[*callbacks, steps[comm.rank]]
        )

    results = run_ranks(2, rank_fn, timeout=30)
    assert all(isinstance(e, ConfigurationError) for e in results), results
    for e in results:
        assert f"keras.callbacks.{name} runs on every rank" in str(e)
        assert str(e).endswith(f"use {replacement}")
    assert [s.batches for s in steps] == [0, 0], "refused before the first step"
    assert not any((tmp_path / r).exists() for r in ("0", "1")), "nothing written"


def test_in_one_process_fit_resumed_takes_kerass_own_callbacks(tmp_path):
    callbacks = [make(tmp_path) for make, _ in KERAS_REFUSED.values()]
    history = fk.fit_resumed(
        make_model(),
        None,
        X,
        Y,
        validation_data=(X[:32], Y[:32]),
        epochs=2,
        verbose=0,
        callbacks=callbacks,
        communicator=LOCAL,
    )
    assert len(history.history["loss"]) == 2
    assert (tmp_path / "best.keras").exists()  # Keras' own ModelCheckpoint ran
    assert (tmp_path / "log.csv").read_text().count("\n") == 3  # Keras' own CSVLogger ran
    assert any((tmp_path / "tb").iterdir())  # and Keras' own TensorBoard


def test_production_callbacks_wraps_extra_and_puts_them_before_the_preemption(tmp_path):
    class Alert(keras.callbacks.Callback):
        pass

    stack = fk.production_callbacks(
        str(tmp_path / "r"),
        tensorboard_dir=str(tmp_path / "tb"),
        extra=[Alert(), keras.callbacks.TerminateOnNaN()],
        communicator=LOCAL,
    )
    kinds = [type(c).__name__ for c in stack]
    assert kinds == [
        "BroadcastInitialState",
        "SyncMetrics",
        "SyncTerminateOnNaN",
        "SyncReduceLROnPlateau",
        "SyncEarlyStopping",
        "ChiefCSVLogger",
        "ChiefTensorBoard",
        "ChiefModelCheckpoint",
        "OnChief",
        "ConsistencyGuard",
        "PreemptionCheckpoint",
    ]
    assert isinstance(stack[8].callback, Alert)
    with pytest.raises(ConfigurationError, match="already holds the distributed EarlyStopping"):
        fk.production_callbacks(
            str(tmp_path / "r"), extra=[keras.callbacks.EarlyStopping()], communicator=LOCAL
        )


def test_a_resume_says_what_it_restored_and_a_finished_run_says_so(tmp_path, capsys):
    root = str(tmp_path / "r")
    fit(make_model(), [fk.ChiefModelCheckpoint(root, communicator=LOCAL)], epochs=2)
    model = make_model()
    restored = fk.restore_latest(model, root, communicator=LOCAL)
    out = capsys.readouterr().out
    assert "resumed from step 8 in" in out and "epoch 2 at its end" in out
    sync = [fk.SyncMetrics(communicator=LOCAL)]
    fk.fit_resumed(model, restored, X, Y, epochs=2, verbose=0, callbacks=sync)
    assert "nothing to train: the checkpoint (step 8) ends at epoch 2, and epochs=2" in (
        capsys.readouterr().out
    )


def test_decisions_count_epochs_as_keras_does(tmp_path, capsys):
    es = fk.SyncEarlyStopping(
        monitor="loss", patience=0, min_delta=100, verbose=1, communicator=LOCAL
    )
    fit(make_model(), [es], epochs=3)
    out = capsys.readouterr().out
    assert out.count("Epoch 2: early stopping") == 1, out  # Keras' words, said once


@pytest.mark.parametrize("name", ["EarlyStopping", "ModelCheckpoint", "CSVLogger"])
def test_a_plain_fit_refuses_kerass_callback_beside_a_forge_one_on_every_rank(tmp_path, name):
    """The tutorial's list half-ported, in a plain model.fit (no fit_resumed): refused at
    train begin on every rank, naming the replacement, before the first step."""
    make, replacement = KERAS_REFUSED[name]
    steps = [Steps(), Steps()]

    def rank_fn(comm):
        callbacks = [fk.SyncEarlyStopping(communicator=comm), make(tmp_path / str(comm.rank))]
        fit(make_model(), [*callbacks, steps[comm.rank]], epochs=1)

    results = run_ranks(2, rank_fn, timeout=30)
    assert all(isinstance(e, ConfigurationError) for e in results), results
    assert all(str(e).endswith(f"use {replacement}") for e in results)
    assert [s.batches for s in steps] == [0, 0]
    assert not any((tmp_path / r).exists() for r in ("0", "1"))


def test_a_plain_fit_whose_ranks_run_different_lists_fails_together(tmp_path):
    def rank_fn(comm):
        callbacks = [fk.SyncEarlyStopping(communicator=comm)]
        if comm.rank == 1:
            callbacks.append(fk.SyncReduceLROnPlateau(communicator=comm))
        fit(make_model(), callbacks, epochs=1)

    results = run_ranks(2, rank_fn, timeout=30)
    assert all(isinstance(e, ConfigurationError) for e in results), results
    assert all("rank 1's forge_dist callbacks differ" in str(e) for e in results)


def test_production_callbacks_takes_a_setting_per_decision(tmp_path):
    stack = fk.production_callbacks(
        str(tmp_path / "r"),
        monitor="val_loss",
        checkpoint={"monitor": "val_mae", "keep_best": 3, "save_best_only": True},
        early_stopping={"patience": 7},
        reduce_lr={"monitor": "loss", "cooldown": 2},
        tensorboard={"log_dir": str(tmp_path / "tb"), "histogram_freq": 2},
        csv={"append": True},
        run_name="exp1",
        overwrite="archive",
        communicator=LOCAL,
    )
    by = {type(c).__name__: c for c in stack}
    ckpt, es, rlr = by["ChiefModelCheckpoint"], by["SyncEarlyStopping"], by["SyncReduceLROnPlateau"]
    assert (ckpt.monitor, ckpt.keep_best, ckpt.save_best_only) == ("val_mae", 3, True)
    assert (ckpt.run_name, ckpt.overwrite) == ("exp1", "archive")
    assert (es.monitor, es.patience, es.restore_best_weights) == ("val_loss", 7, True)
    assert (rlr.monitor, rlr.config.cooldown) == ("loss", 2)
    assert by["ChiefTensorBoard"].histogram_freq == 2 and by["ChiefCSVLogger"].append


def test_production_callbacks_names_its_own_arguments_in_errors(tmp_path):
    with pytest.raises(ConfigurationError, match=r"early_stopping=\{...\}.*patients.*patience"):
        fk.production_callbacks(
            str(tmp_path / "r"), early_stopping={"patients": 3}, communicator=LOCAL
        )
    with pytest.raises(ConfigurationError, match="tensorboard_dir="):
        fk.production_callbacks(
            str(tmp_path / "r"), tensorboard={"histogram_freq": 1}, communicator=LOCAL
        )
    # A run conflict tells the user what to pass to production_callbacks itself.
    fit(make_model(), [fk.ChiefModelCheckpoint(str(tmp_path / "r"), communicator=LOCAL)], 1)
    stack = fk.production_callbacks(
        str(tmp_path / "r"), communicator=LOCAL, preemption_signals=None, verbose=0
    )
    with pytest.raises(ConfigurationError, match="overwrite='delete' to production_callbacks"):
        fit(make_model(), stack, epochs=1)


@pytest.mark.parametrize(
    "make",
    [
        lambda root, comm: fk.ChiefModelCheckpoint(
            root, monitor="val_acc", save_best_only=True, communicator=comm
        ),
        lambda root, comm: fk.SyncEarlyStopping(monitor="val_acc", communicator=comm),
        lambda root, comm: fk.SyncReduceLROnPlateau(monitor="val_acc", communicator=comm),
    ],
)
def test_a_monitor_typo_is_one_error_on_every_rank_listing_the_metrics(tmp_path, make):
    """Keras warns (ModelCheckpoint then saves every epoch: "best" is the last)."""

    def rank_fn(comm):
        model = make_model()
        fit(model, [make(str(tmp_path / f"best{comm.rank}.keras"), comm)], epochs=2)

    results = run_ranks(2, rank_fn, timeout=60)
    for e in results:
        assert isinstance(e, ConfigurationError), results
        assert "monitor 'val_acc' is not in the logs (available: loss, mae, val_loss" in str(e)
    assert not list(tmp_path.glob("best*")), "nothing saved"


def test_epochs_without_validation_neither_decide_nor_replace_the_best_model(tmp_path):
    """validation_freq=2: val_loss exists every other epoch. Early stopping waits for it
    (as Keras does); the best model is never replaced by an unvalidated one (Keras would
    save it)."""
    path = tmp_path / "best.keras"
    seen = []

    class Saves(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, "val_loss" in logs, path.exists() and os.path.getmtime(path)))

    es = fk.SyncEarlyStopping(monitor="val_loss", patience=9, communicator=LOCAL)
    ckpt = fk.ChiefModelCheckpoint(
        str(path), monitor="val_loss", save_best_only=True, communicator=LOCAL
    )
    make_model().fit(X, Y, validation_data=(X[:32], Y[:32]), validation_freq=2, epochs=4,
                     batch_size=32, verbose=0, callbacks=[es, ckpt, Saves()])  # fmt: skip
    validated = [e for e, has, _ in seen if has]
    assert validated == [1, 3]
    saved_at = [t for _, _, t in seen]
    assert saved_at[0] is False  # epoch 1 (no validation): nothing saved yet
    assert saved_at[2] == saved_at[1]  # epoch 3 (no validation): the file untouched
    assert es.best == ckpt.best is not None


def test_a_rank_dependent_setting_fails_on_every_rank_before_the_first_step():
    steps = [Steps(), Steps()]

    def rank_fn(comm):
        es = fk.SyncEarlyStopping(patience=3 + comm.rank, communicator=comm)  # rank 1: 4
        fit(make_model(), [es, steps[comm.rank]], epochs=1)

    results = run_ranks(2, rank_fn, timeout=30)
    assert all(isinstance(e, ConfigurationError) for e in results), results
    assert all("rank 1's early-stopping / learning-rate callbacks" in str(e) for e in results)
    assert [s.batches for s in steps] == [0, 0]


CUSTOM_LOOP = """
import sys
import numpy as np
from forge_dist import keras as fk
from forge_dist.comm import LocalCommunicator
from forge_dist.keras import _compat
from forge_dist.storage import CheckpointStore

keras = _compat.keras
model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
local = LocalCommunicator()
es = fk.SyncEarlyStopping(monitor="val_loss", patience=1, communicator=local)
ckpt = fk.ChiefModelCheckpoint(sys.argv[1], communicator=local)
# Keras' own CallbackList, as a custom training loop makes it: no fit, no params.
hooks = keras.callbacks.CallbackList([fk.SyncMetrics(communicator=local), es, ckpt], model=model)
hooks.on_train_begin()
for epoch, val in enumerate([1.0, 0.5, 0.7, 0.8, 0.9]):
    hooks.on_epoch_begin(epoch)
    model.train_on_batch(np.ones((4, 2)), np.ones((4, 1)))  # the loop's own step
    hooks.on_epoch_end(epoch, {"loss": val, "val_loss": val})
    if model.stop_training:
        break
hooks.on_train_end()
print("RESULT", _compat.FLAVOR, epoch, es.stopped_epoch, CheckpointStore(sys.argv[1]).steps())
"""


@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_a_custom_loop_calling_the_hooks_through_kerass_callback_list(tmp_path, flavor):
    """tf_keras' callbacks have no ``params`` until ``set_params``, which a custom loop's
    ``CallbackList`` without params never calls: the hooks still run, decide and save."""
    import subprocess
    import sys

    legacy = "1" if flavor == "tf_keras" else "0"
    out = subprocess.run(
        [sys.executable, "-c", CUSTOM_LOOP, str(tmp_path / "root")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_USE_LEGACY_KERAS": legacy},
    )
    # best at epoch 1 (0.5), worse at epoch 2: patience 1 stops there; the checkpoint
    # saved each of the three epochs that ran (steps 1-3, one train step each).
    assert f"RESULT {flavor} 2 2 [1, 2, 3]" in out.stdout, out.stderr[-3000:]
