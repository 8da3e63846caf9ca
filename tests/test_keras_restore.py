"""restore_latest in one process (resumes under launchers: test_e2e_*.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class EpochWeights(keras.callbacks.Callback):
    """The model's weights and optimizer variables at every epoch end."""

    def __init__(self):
        super().__init__()
        self.weights, self.optimizer = {}, {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [w.copy() for w in self.model.get_weights()]
        self.optimizer[epoch] = [np.array(v) for v in self.model.optimizer.variables]


def assert_holds(model, weights, optimizer):
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.variables, optimizer, strict=True):
        np.testing.assert_array_equal(np.array(a), b)


def test_restore_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    root = tmp_path / "r"
    model = make_model()
    seen = EpochWeights()
    fit(model, [fk.ChiefModelCheckpoint(str(root), communicator=LOCAL), seen], epochs=2)
    newest = root / "step-00000008" / "model.keras"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    fresh = make_model()
    with caplog.at_level("WARNING"):
        r = fk.restore_latest(fresh, str(root), communicator=LOCAL)
    assert r.step == 4 and r.skipped == ["step-00000008"] and r.initial_epoch == 1
    assert any("step-00000008" in m for m in caplog.messages)
    # Step 4's weights and optimizer state (the end of epoch 0), not the corrupt step's,
    # nor the fresh model's own.
    assert_holds(fresh, seen.weights[0], seen.optimizer[0])
    assert int(fresh.optimizer.iterations.numpy()) == 4


def test_restore_loads_the_newest_steps_weights_and_optimizer_state(tmp_path):
    root = tmp_path / "r"
    seen = EpochWeights()
    fit(make_model(), [fk.ChiefModelCheckpoint(str(root), communicator=LOCAL), seen], epochs=2)
    fresh = make_model(seed=11)  # other initial weights
    r = fk.restore_latest(fresh, str(root), communicator=LOCAL)
    assert r.step == 8 and r.initial_epoch == 2
    assert_holds(fresh, seen.weights[1], seen.optimizer[1])


def test_restore_with_nothing_saved_is_a_fresh_start(tmp_path):
    model = make_model()
    before = [w.copy() for w in model.get_weights()]
    r = fk.restore_latest(model, str(tmp_path / "none"), communicator=LOCAL)
    assert not r.restored and r.initial_epoch == 0
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # nothing changed


class CountingFile:
    """A step's file as the store's backend opened it, counting the bytes read."""

    def __init__(self, f, total):
        self.f, self.total = f, total

    def readinto(self, b):
        n = self.f.readinto(b)
        self.total[0] += n
        return n

    def read(self, n=-1):
        data = self.f.read(n)
        self.total[0] += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_restore_reads_the_step_once_into_the_models_own_variables(tmp_path, monkeypatch):
    """Keras 3: the step's file is read once, every byte hashed as it is read, and its
    arrays are assigned into the model's variables: no download to a temporary copy, no
    second model from keras.models.load_model; weights and optimizer bit-identical."""
    from forge_dist.keras import _read_step
    from forge_dist.storage import CheckpointStore

    root = tmp_path / "r"
    seen = EpochWeights()
    fit(make_model(), [fk.ChiefModelCheckpoint(str(root), communicator=LOCAL), seen], epochs=2)
    total = [0]  # every read of a step's file, for a restore or a verify, goes through it
    backend = type(CheckpointStore(str(root))._backend)
    opened = backend.open_read
    monkeypatch.setattr(backend, "open_read", lambda s, *a: CountingFile(opened(s, *a), total))

    def not_this_way(*args, **kwargs):
        raise AssertionError("restored through a download and a second model")

    monkeypatch.setattr(CheckpointStore, "download", not_this_way)
    monkeypatch.setattr(_read_step, "load_payload", not_this_way)
    fresh = make_model(seed=11)
    r = fk.restore_latest(fresh, str(root), communicator=LOCAL)
    assert r.step == 8 and r.initial_epoch == 2
    assert_holds(fresh, seen.weights[1], seen.optimizer[1])
    size = CheckpointStore(str(root)).get(8).manifest.files[0].size
    assert total[0] == size, "every byte read once"


def test_a_step_that_cannot_be_read_in_place_is_loaded_the_usual_way(tmp_path, monkeypatch):
    from forge_dist.keras import h5read

    root = tmp_path / "r"
    seen = EpochWeights()
    fit(make_model(), [fk.ChiefModelCheckpoint(str(root), communicator=LOCAL), seen], epochs=2)

    def refuse(*args):
        raise h5read.NotInPlace("say, a compressed archive")

    monkeypatch.setattr(h5read, "arrays_in_place", refuse)
    fresh = make_model(seed=11)
    r = fk.restore_latest(fresh, str(root), communicator=LOCAL)
    assert r.step == 8
    assert_holds(fresh, seen.weights[1], seen.optimizer[1])
