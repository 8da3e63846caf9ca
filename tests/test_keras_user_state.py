"""The user's own callbacks keep their state across resumes (``get_state``/``set_state``
through ``OnChief`` or ``extra=[...]``): the tutorial's alert fires once per run; and a
callback's state is stored under its kind and settings, so reordering the list never
hands one callback another's state."""

from __future__ import annotations

import os
import signal

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, X, Y, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.preemption import Preempted  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402


class AlertOnce(keras.callbacks.Callback):
    """The tutorial's alert: once val_loss drops below a threshold, say so, once."""

    def __init__(self, below):
        super().__init__()
        self.below, self.fired, self.said = below, False, []

    def on_epoch_end(self, epoch, logs=None):
        if not self.fired and logs["val_loss"] < self.below:
            self.fired = True
            self.said.append(epoch)

    def get_state(self):
        return {"fired": self.fired}

    def set_state(self, state):
        self.fired = state["fired"]


class SignalAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGUSR1)


def stack(root, alert, extra=()):
    return [
        *extra,
        *fk.production_callbacks(
            root, extra=[alert], communicator=LOCAL, verbose=0, preemption_check_every_n_batches=1
        ),
    ]


def test_the_tutorials_alert_fires_once_per_run_across_a_resume(tmp_path):
    root = str(tmp_path / "r")
    first = AlertOnce(below=10.0)  # fires at the first epoch's end
    data = dict(validation_data=(X[:32], Y[:32]), epochs=4, batch_size=32, verbose=0)
    with pytest.raises(Preempted):
        fk.fit_resumed(
            make_model(), None, X, Y, callbacks=stack(root, first, [SignalAt(2)]), **data
        )
    assert first.said == [0]
    saved = CheckpointStore(root).newest().state["callbacks"]
    assert saved["on_chief[AlertOnce]"] == {"state": {"fired": True}}
    model, again = make_model(), AlertOnce(below=10.0)
    restored = fk.restore_latest(model, root, communicator=LOCAL, verbose=0)
    fk.fit_resumed(model, restored, X, Y, callbacks=stack(root, again), **data)
    assert again.fired and again.said == []  # it had fired in this run: not again


def test_reordering_callbacks_does_not_swap_their_restored_state(tmp_path):
    root = str(tmp_path / "r")

    def two():
        return (
            fk.SyncEarlyStopping(monitor="loss", patience=9, communicator=LOCAL),
            fk.SyncEarlyStopping(monitor="val_loss", patience=9, communicator=LOCAL),
        )

    on_loss, on_val = two()
    fit(make_model(), [on_loss, on_val, fk.ChiefModelCheckpoint(root, communicator=LOCAL)])
    assert on_loss.best != on_val.best
    assert (on_loss.state_name, on_val.state_name) == (
        "early_stopping[loss]",
        "early_stopping[val_loss]",
    )
    model = make_model()
    restored = fk.restore_latest(model, root, communicator=LOCAL, verbose=0)
    loss_again, val_again = two()
    # The other order; nothing left to train, so train begin alone takes the states back.
    fit(model, [val_again, loss_again], epochs=restored.initial_epoch,
        initial_epoch=restored.initial_epoch)  # fmt: skip
    assert (loss_again.best, val_again.best) == (on_loss.best, on_val.best)
