"""Keras' file paths in ChiefModelCheckpoint: ``models/best_model.keras``, templates,
``.weights.h5``, ``save_freq``, ``initial_value_threshold`` — the files Keras' own
ModelCheckpoint writes appear at those paths, each atomically replaced and verifiable
(``forge-dist verify <file>``); a SIGKILL inside a file's save: test_storage_files.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, X, Y, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.storage.files import SIDECAR, check_file  # noqa: E402

FORGE_DIST = os.path.join(os.path.dirname(sys.executable), "forge-dist")


class Record(keras.callbacks.Callback):
    """Each epoch end: the logs and the weights, as the epoch left them."""

    def __init__(self):
        super().__init__()
        self.logs, self.weights = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def cli(*args, options=None):
    cmd = [FORGE_DIST, *args]
    if options:
        cmd += ["--storage-options", json.dumps(options)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_best_model_keras_holds_the_best_epochs_model_and_verifies(tmp_path):
    path = tmp_path / "models" / "best_model.keras"  # the folder does not exist yet
    model, record = make_model(), Record()
    ckpt = fk.ChiefModelCheckpoint(
        filepath=str(path), monitor="val_mae", save_best_only=True, communicator=LOCAL
    )
    fit(model, [ckpt, record], epochs=6)
    maes = [logs["val_mae"] for logs in record.logs]
    best = int(np.argmin(maes))  # Keras: strictly better only, so the first of equals
    assert ckpt.best == maes[best]
    loaded = keras.models.load_model(path)
    assert same(loaded.get_weights(), record.weights[best])
    side = json.loads((tmp_path / "models" / f"best_model.keras{SIDECAR}").read_text())
    assert side["epoch"] == best and side["metrics"]["val_mae"] == maes[best]
    assert len(side["previous"]) == min(2, len(set(np.minimum.accumulate(maes))) - 1)
    out = cli("verify", str(path))
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    # A flipped byte is found, and named.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    out = cli("verify", str(path), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and doc["checkpoints"][0]["problems"][0]["kind"] == "hash_mismatch"


def test_templates_name_each_save_with_the_epoch_and_the_logged_values(tmp_path):
    template = str(tmp_path / "m_{epoch:02d}_{val_loss:.4f}.keras")
    record = Record()
    fit(make_model(), [fk.ChiefModelCheckpoint(template, communicator=LOCAL), record], epochs=3)
    want = {f"m_{e + 1:02d}_{logs['val_loss']:.4f}.keras" for e, logs in enumerate(record.logs)}
    got = {n for n in os.listdir(tmp_path) if n.endswith(".keras")}
    assert got == want
    for name in want:
        assert check_file(str(tmp_path / name)).report.ok


def test_save_freq_in_batches_names_the_epoch_and_batch_as_keras_does(tmp_path):
    # 128 samples in batches of 32: 4 batches an epoch; every 6 batches -> epoch 2 batch 2,
    # epoch 3 batch 4 (Keras counts batches across epochs, names them from 1).
    template = str(tmp_path / "e{epoch:02d}b{batch:02d}.keras")
    ckpt = fk.ChiefModelCheckpoint(template, save_freq=6, communicator=LOCAL)
    fit(make_model(), [ckpt], epochs=3)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".keras")) == [
        "e02b02.keras",
        "e03b04.keras",
    ]


@pytest.mark.parametrize(
    "threshold, mode, saved", [(-0.01, "max", True), (None, "auto", True), (0.0, "min", False)]
)
def test_initial_value_threshold_is_the_best_to_beat(tmp_path, threshold, mode, saved):
    path = tmp_path / "c.keras"
    ckpt = fk.ChiefModelCheckpoint(
        str(path),
        monitor="val_loss",
        mode=mode,
        save_best_only=True,
        initial_value_threshold=threshold,
        communicator=LOCAL,
    )
    fit(make_model(), [ckpt], epochs=1)
    assert path.exists() == saved


def test_a_weights_file_loads_into_the_model(tmp_path):
    path = tmp_path / "w.weights.h5"
    model = make_model()
    fit(model, [fk.ChiefModelCheckpoint(str(path), save_weights_only=True, communicator=LOCAL)])
    other = make_model(seed=9)
    other.optimizer.build(other.trainable_variables)  # (the file holds its variables too)
    other.load_weights(path)
    assert same(other.get_weights(), model.get_weights())
    assert check_file(str(path)).report.ok


@pytest.mark.parametrize(
    "path, kw, words",
    [
        ("w.weights.h5", {}, "must end in `.keras`"),
        ("best.keras", {"save_weights_only": True}, "must end in `.weights.h5`"),
        ("model-{epoch:02d}", {}, "must end in `.keras`"),
        ("best.keras", {"keep_last": 2}, "keep_last applies to a checkpoint folder"),
        ("best.keras", {"overwrite": "delete"}, "overwrite applies to a checkpoint folder"),
        ("runs/x", {"save_freq": "batch"}, "Unrecognized save_freq"),
    ],
)
def test_kerass_filepath_rules_in_kerass_words(path, kw, words):
    with pytest.raises(ConfigurationError, match=words.replace("(", r"\(")):
        fk.ChiefModelCheckpoint(path, communicator=LOCAL, **kw)


def test_a_template_naming_a_missing_value_fails_naming_what_there_is(tmp_path):
    ckpt = fk.ChiefModelCheckpoint(str(tmp_path / "m_{val_f1:.2f}.keras"), communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="Failed to format.*val_mae"):
        fit(make_model(), [ckpt], epochs=1)
    assert os.listdir(tmp_path) == []


def test_preemption_needs_a_folder_to_resume_from(tmp_path):
    ckpt = fk.ChiefModelCheckpoint(str(tmp_path / "best.keras"), communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="Keras file path"):
        fk.PreemptionCheckpoint(ckpt, communicator=LOCAL)


def test_a_keras_file_and_the_resumable_store_work_side_by_side(tmp_path):
    """The file keeps Keras' semantics; the folder beside it is the resumable store, and
    the file's best is part of the state it restores (no worse model after a resume)."""
    best, root = str(tmp_path / "best.keras"), str(tmp_path / "steps")

    def callbacks():
        return [
            fk.ChiefModelCheckpoint(best, save_best_only=True, communicator=LOCAL),
            fk.ChiefModelCheckpoint(root, communicator=LOCAL),
        ]

    first, seen = callbacks(), Record()
    fit(make_model(), [*first, seen], epochs=2)
    model = make_model()
    restored = fk.restore_latest(model, root, communicator=LOCAL, verbose=0)
    again = callbacks()
    assert again[0].best is None
    fk.fit_resumed(
        model,
        restored,
        X,
        Y,
        epochs=4,
        batch_size=32,
        verbose=0,
        callbacks=[*again, seen],
        validation_data=(X[:32], Y[:32]),
        shuffle=False,
    )
    losses = [logs["val_loss"] for logs in seen.logs]
    assert len(losses) == 4
    assert again[0].best == min(losses)  # the restored best, then the resumed epochs'
    side = check_file(best).sidecar
    assert side["epoch"] == int(np.argmin(losses)) and check_file(best).report.ok
    assert cli("verify", root).returncode == 0
