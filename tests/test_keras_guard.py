"""ConsistencyGuard: a silent desync is caught (simulated ranks in threads)."""

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
from forge_dist.keras import _compat  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("on_mismatch", ["raise", "warn", "repair"])
def test_consistency_guard_catches_a_silent_desync(on_mismatch):
    def rank_fn(comm):
        keras.utils.set_random_seed(comm.rank)  # a desync: different weights per rank
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        guard = fk.ConsistencyGuard(on_mismatch=on_mismatch, communicator=comm)
        guard.set_model(model)
        guard.on_epoch_end(0, {})
        return guard.mismatches, _compat.weights_fingerprint(model.get_weights())

    results = run_ranks(2, rank_fn, timeout=30)
    if on_mismatch == "raise":
        assert all(isinstance(e, CollectiveMismatchError) for e in results), results
        assert all("rank(s) 1" in str(e) for e in results)
        return
    (m0, f0), (m1, f1) = results
    assert m0 == m1 == 1
    assert (f0 == f1) == (on_mismatch == "repair")


def test_a_desync_names_the_likely_causes_the_forgotten_optimizer_first(capsys):
    """The new user's case: a plain optimizer under several ranks. The fit says so at
    train begin (chief), and the guard's error names it as the first likely cause."""
    from kerashelp import X, Y

    def rank_fn(comm):
        keras.utils.set_random_seed(3)  # the same start; the gradients are not averaged
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        own = slice(comm.rank * 64, comm.rank * 64 + 64)  # each rank its own shard
        guard = fk.ConsistencyGuard(communicator=comm)
        model.fit(X[own], Y[own], epochs=2, batch_size=32, verbose=0, callbacks=[guard])

    results = run_ranks(2, rank_fn, timeout=60)
    assert all(isinstance(e, CollectiveMismatchError) for e in results), results
    for e in results:
        assert "epoch 1: weights differ" in str(e)
        assert "(1) the optimizer does not average gradients" in str(e)
        assert "DistributedOptimizer(optimizer)" in str(e)
    out = capsys.readouterr().out
    assert out.count("SGD does not average gradients across the 2 ranks") == 1
