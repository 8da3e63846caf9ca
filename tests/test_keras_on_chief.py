"""OnChief: a user's callback runs once, on the chief, with the synced logs; its failure
is an error on every rank in the same call (simulated ranks in threads)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError, ForgeDistError  # noqa: E402


class Recorder(keras.callbacks.Callback):
    def __init__(self, fail_at=None):
        super().__init__()
        self.calls, self.fail_at = [], fail_at

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append((epoch, dict(logs)))
        if epoch == self.fail_at:
            raise RuntimeError("webhook down")


def two_ranks(fail_at=None, on_error="raise"):
    def rank_fn(comm):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        recorder = Recorder(fail_at)
        sync = fk.SyncMetrics(communicator=comm)
        wrapped = fk.OnChief(recorder, on_error=on_error, communicator=comm)
        for cb in (sync, wrapped):
            cb.set_model(model)
        for epoch in range(3):
            logs = {"val_accuracy": [0.6, 0.5][comm.rank] + epoch / 10}
            sync.on_epoch_end(epoch, logs)
            wrapped.on_epoch_end(epoch, logs)
        return recorder.calls

    return run_ranks(2, rank_fn, timeout=30)


def test_the_callback_runs_once_on_the_chief_with_the_synced_values():
    chief, other = two_ranks()
    assert other == []
    assert [e for e, _ in chief] == [0, 1, 2]
    assert chief[0][1]["val_accuracy"] == pytest.approx(0.55)  # the mean, not rank 0's 0.6


def test_its_failure_is_an_error_on_every_rank_in_the_same_epoch():
    results = two_ranks(fail_at=1)
    assert isinstance(results[0], RuntimeError) and "webhook down" in str(results[0])
    assert isinstance(results[1], ForgeDistError)
    assert "OnChief(Recorder).on_epoch_end failed on rank 0" in str(results[1])
    assert "webhook down" in str(results[1])


def test_on_error_warn_goes_on(caplog):
    chief, other = two_ranks(fail_at=1, on_error="warn")
    assert [e for e, _ in chief] == [0, 1, 2] and other == []
    assert "webhook down" in caplog.text


def test_bad_wrapping_is_refused():
    from forge_dist.comm import LocalCommunicator

    local = LocalCommunicator()
    with pytest.raises(ConfigurationError, match="wraps a Keras callback"):
        fk.OnChief(print, communicator=local)
    with pytest.raises(ConfigurationError, match="already runs on every rank"):
        fk.OnChief(fk.SyncMetrics(communicator=local), communicator=local)
    with pytest.raises(ConfigurationError, match="on_error"):
        fk.OnChief(Recorder(), on_error="ignore", communicator=local)
