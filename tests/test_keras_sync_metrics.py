"""SyncMetrics: means across ranks (simulated ranks in threads)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import (  # noqa: E402
    CollectiveMismatchError,
)

HERE = os.path.dirname(os.path.abspath(__file__))


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


class Counting:
    """Wraps a communicator and counts its collectives by kind."""

    def __init__(self, comm):
        self.comm, self.calls = comm, []

    def __getattr__(self, name):
        attr = getattr(self.comm, name)
        if name in ("allgather", "broadcast", "allreduce"):

            def counted(*a, **k):
                self.calls.append(name)
                return attr(*a, **k)

            return counted
        return attr


def epochs_with(comm, order, patience=(1, 1), losses=(3.0, 2.0, 2.5, 2.6, 2.7)):
    """Three callbacks over a model for a few epochs; the collectives and decisions."""
    counting = Counting(comm)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    made = {
        "sync": fk.SyncMetrics(communicator=counting),
        "rlr": fk.SyncReduceLROnPlateau(patience=1, communicator=counting),
        "es": fk.SyncEarlyStopping(patience=patience[comm.rank], communicator=counting),
    }
    cbs = [made[k] for k in order]
    for cb in cbs:
        cb.set_model(model)
        cb.on_train_begin()
    stopped = None
    for epoch, loss in enumerate(losses):
        counting.calls.clear()
        logs = {"loss": loss + comm.rank, "val_loss": loss - comm.rank}  # means: loss
        for cb in cbs:
            cb.on_epoch_end(epoch, logs)
        if model.stop_training:
            stopped = epoch
            break
    return counting.calls, stopped, float(model.optimizer.learning_rate.numpy())


def test_decisions_after_synced_metrics_need_no_collective_of_their_own():
    r0, r1 = run_ranks(2, lambda c: epochs_with(c, ["sync", "rlr", "es"]))
    assert r0 == r1
    calls, stopped, lr = r0
    assert stopped == 2 and lr < 0.1  # the decisions were taken (and taken alike)
    assert calls == ["allgather"]  # the metric sync alone, in the stopping epoch too


@pytest.mark.parametrize("order", [["es", "sync", "rlr"], ["rlr", "es"], ["es"]])
def test_the_first_forge_callback_syncs_the_logs_wherever_syncmetrics_stands(order):
    """Without SyncMetrics, or after the deciders: the first forge_dist callback to see
    the epoch's logs syncs them (one all-gather), and every decision is the synced one."""
    r0, r1 = run_ranks(2, lambda c: epochs_with(c, order))
    assert r0 == r1
    calls, stopped, lr = r0
    assert calls == ["allgather"]
    assert stopped == 2
    if "rlr" in order:
        assert lr < 0.1

    def best_seen(comm):  # each rank's loss is its own; the decision's is their mean
        es = fk.SyncEarlyStopping(monitor="loss", patience=5, communicator=comm)
        es.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
        es.on_train_begin()
        es.on_epoch_end(0, {"loss": 1.0 + 2 * comm.rank})
        return es.best

    assert run_ranks(2, best_seen) == [2.0, 2.0]


def test_ranks_whose_deciding_state_differs_fail_together_before_deciding():
    results = run_ranks(2, lambda c: epochs_with(c, ["sync", "rlr", "es"], patience=(1, 3)))
    for r in results:
        assert isinstance(r, CollectiveMismatchError), r
        assert "rank(s) 1 differs" in str(r)


def test_ranks_whose_learning_rate_differs_fail_together_before_reducing_it():
    """The learning rate is part of what SyncReduceLROnPlateau decides from."""

    def run(comm):
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1 * (1 + comm.rank)), loss="mse")
        cbs = [fk.SyncMetrics(communicator=comm), fk.SyncReduceLROnPlateau(communicator=comm)]
        for cb in cbs:
            cb.set_model(model)
            cb.on_train_begin()
        for cb in cbs:
            cb.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.0})

    for r in run_ranks(2, run):
        assert isinstance(r, CollectiveMismatchError), r
        assert "rank(s) 1 differs" in str(r)
