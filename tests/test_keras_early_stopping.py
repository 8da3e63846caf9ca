"""SyncEarlyStopping: one decision for every rank."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402
from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import (  # noqa: E402
    ConfigurationError,
)

HERE = os.path.dirname(os.path.abspath(__file__))


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


def test_unknown_monitor_fails_at_the_first_epoch_with_the_available_keys(tmp_path):
    with pytest.raises(ConfigurationError, match="available: .*val_loss"):
        fit(make_model(), [fk.SyncEarlyStopping(monitor="val_lss", mode="min", communicator=LOCAL)])
