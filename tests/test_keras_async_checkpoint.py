"""ChiefModelCheckpoint(async_save=True): a host snapshot at the save point, written by
one background thread while training goes on."""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

import kerashelp  # noqa: E402
from kerashelp import LOCAL, X  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError, ForgeDistError  # noqa: E402
from forge_dist.keras import _compat  # noqa: E402
from forge_dist.storage import CheckpointStore, _faults  # noqa: E402

GATE_S = 60  # no test waits longer than this on its own gate


def make_model():
    return kerashelp.make_model(units=8, seed=4, distributed=True)


def fit(model, callbacks, epochs=3):
    kerashelp.fit(model, callbacks, epochs=epochs, batch_size=16)  # 8 batches an epoch


class Record(keras.callbacks.Callback):
    """Weights at every epoch end, and a hook at one (epoch, batch) end."""

    def __init__(self, at=None, action=None):
        super().__init__()
        self.weights, self.at, self.action, self.epoch = {}, at, action, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.action()

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [w.copy() for w in self.model.get_weights()]


@pytest.fixture
def gate():
    """Hold the background writer of ``step`` at its first store point until released."""

    class Gate:
        def __init__(self):
            self.step, self.reached, self.open = None, threading.Event(), threading.Event()

        def hook(self, point):
            if threading.current_thread() is threading.main_thread():
                return
            if self.step is not None and not self.reached.is_set():
                self.reached.set()
                assert self.open.wait(GATE_S), "the test never released the writer"

    g = Gate()
    _faults.hook = g.hook
    yield g
    _faults.hook = None


def test_the_saved_weights_are_the_save_points_even_though_training_went_on(tmp_path, gate):
    model = make_model()
    gate.step = 8  # epoch 0's save
    released = {}

    def release():  # 3 batches into epoch 1: the model has moved on
        assert gate.reached.wait(GATE_S), "the background save never started"
        released["weights"] = [w.copy() for w in model.get_weights()]
        gate.open.set()

    rec = Record(at=(1, 2), action=release)
    ckpt = fk.ChiefModelCheckpoint(str(tmp_path), communicator=LOCAL, async_save=True)
    fit(model, [rec, ckpt])
    store = CheckpointStore(str(tmp_path))
    assert store.steps() == [8, 16, 24]  # on_train_end waited for the last commit
    assert ckpt.async_checkpointer is not None and not ckpt.async_checkpointer.busy
    loaded = keras.models.load_model(str(tmp_path / "step-00000008" / "model.keras"))
    saved = loaded.get_weights()
    assert _compat.weights_fingerprint(saved) == _compat.weights_fingerprint(rec.weights[0])
    assert _compat.weights_fingerprint(saved) != _compat.weights_fingerprint(released["weights"])
    assert int(loaded.optimizer.iterations.numpy()) == 8  # the optimizer's state too
    for step in store.steps():
        assert store.verify(step).ok


@pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="per-thread nice: Linux")
def test_the_background_writer_runs_at_a_lower_priority_than_training(tmp_path, gate):
    from forge_dist._background import BACKGROUND_NICENESS

    gate.step = 8
    seen = {}

    def look():  # in the training loop, while the writer is held inside the save
        assert gate.reached.wait(GATE_S), "the background save never started"
        (writer,) = [t for t in threading.enumerate() if t.name == "forge-dist-save step 8"]
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, writer.native_id)
        seen["training"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        gate.open.set()

    ckpt = fk.ChiefModelCheckpoint(str(tmp_path), communicator=LOCAL, async_save=True)
    fit(make_model(), [Record(at=(1, 0), action=look), ckpt], epochs=2)
    assert seen["writer"] == min(19, seen["training"] + BACKGROUND_NICENESS), seen
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == seen["training"]


def test_async_checkpoint_loads_like_a_synchronous_one(tmp_path):
    sync_root, async_root = tmp_path / "sync", tmp_path / "async"
    for root, flag in ((sync_root, False), (async_root, True)):
        fit(
            make_model(),
            [fk.ChiefModelCheckpoint(str(root), communicator=LOCAL, async_save=flag)],
            2,
        )
    a = keras.models.load_model(str(sync_root / "step-00000016" / "model.keras"))
    b = keras.models.load_model(str(async_root / "step-00000016" / "model.keras"))
    assert type(a.optimizer) is type(b.optimizer)
    assert float(a.optimizer.learning_rate) == float(b.optimizer.learning_rate)
    for u, v in zip(
        a.get_weights() + [x.numpy() for x in a.optimizer.variables],
        b.get_weights() + [x.numpy() for x in b.optimizer.variables],
        strict=True,
    ):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.predict(X, verbose=0), b.predict(X, verbose=0))


class FillDisk(keras.callbacks.Callback):
    """After the checkpoint's pre-flight (it comes later in the list): fill the disk."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def on_train_begin(self, logs=None):
        path = os.path.join(self.folder, "filler")
        with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)


def test_a_background_failure_is_raised_at_the_next_epoch_end(tmp_path):
    from mounts import tmpfs

    with tmpfs(tmp_path / "small", "1m") as mnt:  # a real disk that is full by the save
        root = str(mnt / "root")
        model = make_model()
        ckpt = fk.ChiefModelCheckpoint(root, communicator=LOCAL, async_save=True)
        rec = Record()
        with pytest.raises(ForgeDistError, match="background save of step 8 failed.*no space"):
            fit(model, [rec, ckpt, FillDisk(str(mnt))])
        assert sorted(rec.weights) == [0, 1]  # raised at the end of epoch 1, not lost
        store = CheckpointStore(root)
        assert store.steps() == [] and store.list_staging() == []


def test_when_busy_skip_skips_and_says_so_on_every_rank(tmp_path, gate):
    gate.step = 8

    class Release(keras.callbacks.Callback):  # after the checkpoint's epoch-1 decision
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                gate.open.set()

    ckpt = fk.ChiefModelCheckpoint(
        str(tmp_path), communicator=LOCAL, async_save=True, when_busy="skip"
    )
    fit(make_model(), [ckpt, Release()])
    assert ckpt.saved_steps == [8, 24]
    assert CheckpointStore(str(tmp_path)).steps() == [8, 24]


def test_async_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ConfigurationError, match="when_busy"):
        fk.ChiefModelCheckpoint(str(tmp_path), communicator=LOCAL, when_busy="later")


TF_KERAS = """
import os, sys
import numpy as np
from forge_dist import keras as fk
from forge_dist.comm import LocalCommunicator
from forge_dist.keras import _compat
keras, local = _compat.keras, LocalCommunicator()
x = np.random.default_rng(0).normal(size=(128, 4)).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
opt = fk.DistributedOptimizer(keras.optimizers.Adam(0.01), communicator=local)
model.compile(optimizer=opt, loss="mse")
ckpt = fk.ChiefModelCheckpoint(sys.argv[1], communicator=local, async_save=True)
model.fit(x, x[:, :1], epochs=2, batch_size=16, verbose=0, callbacks=[ckpt])
m = keras.models.load_model(os.path.join(sys.argv[1], "step-00000016", "model.keras"))
same = _compat.weights_fingerprint(m.get_weights()) == _compat.weights_fingerprint(
    model.get_weights())
print("RESULT", _compat.FLAVOR, int(m.optimizer.iterations.numpy()), same)
"""


def test_async_save_on_tf_keras(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", TF_KERAS, str(tmp_path / "root")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1"},
    )
    assert "RESULT tf_keras 16 True" in out.stdout, out.stderr[-3000:]


EXIT_MID_WRITE = """
import sys, threading
import numpy as np
import keras
from forge_dist import keras as fk
from forge_dist.comm import LocalCommunicator
from forge_dist.storage import _faults

gate = threading.Event()
def hold(point):  # the background writer waits here until the loop has failed
    if threading.current_thread() is not threading.main_thread():
        gate.wait(60)
_faults.hook = hold

class Fail(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.optimizer.iterations.numpy() == 10:
            gate.set()
            raise RuntimeError("the training loop failed")

x = np.random.default_rng(0).normal(size=(128, 4)).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
ckpt = fk.ChiefModelCheckpoint(sys.argv[1], communicator=LocalCommunicator(), async_save=True)
model.fit(x, x[:, :1], epochs=3, batch_size=16, verbose=0, callbacks=[ckpt, Fail()])
"""


def test_interpreter_exit_waits_for_the_save_in_flight(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "root"
    out = subprocess.run(
        [sys.executable, "-c", EXIT_MID_WRITE, str(root)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 1 and "the training loop failed" in out.stderr
    store = CheckpointStore(str(root))
    assert store.steps() == [8]  # written after the loop had died, before the process ended
    assert store.verify(8).ok


def test_a_background_failure_reaches_every_rank_in_the_same_epoch(tmp_path):
    from threadcomm import run_ranks

    def fail(point):
        if threading.current_thread().name.startswith("forge-dist-save"):
            raise OSError(5, "Input/output error (injected)")

    def rank_fn(comm):
        model = make_model()
        cb = fk.ChiefModelCheckpoint(str(tmp_path / "root"), communicator=comm, async_save=True)
        cb.set_model(model)
        cb.on_train_begin()
        cb.on_epoch_end(0, {"val_loss": 1.0})  # the chief's write fails in the background
        model.optimizer.iterations.assign_add(1)
        cb.on_epoch_end(1, {"val_loss": 0.9})  # ...and every rank hears of it here

    _faults.hook = fail
    try:
        results = run_ranks(2, rank_fn, timeout=60)
    finally:
        _faults.hook = None
    assert all(isinstance(e, ForgeDistError) for e in results), results
    assert all("Input/output error (injected)" in str(e) for e in results), results
