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
