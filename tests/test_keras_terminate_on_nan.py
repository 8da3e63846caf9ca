"""SyncTerminateOnNaN: any rank's non-finite loss stops every rank at the same batch."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, make_model  # noqa: E402
from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402


def test_a_nan_on_one_rank_stops_both_at_that_batch(capsys):
    def rank_fn(comm):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        cb = fk.SyncTerminateOnNaN(communicator=comm)
        cb.set_model(model)
        cb.on_epoch_begin(0)
        for batch in range(6):
            loss = math.nan if (comm.rank == 1 and batch == 3) else 0.5
            cb.on_train_batch_end(batch, {"loss": loss})
            if getattr(model, "stop_training", False):
                return batch
        return None

    assert run_ranks(2, rank_fn, timeout=30) == [3, 3]
    out = capsys.readouterr().out
    assert out.count("Batch 3: Invalid loss, terminating training") == 1 and "rank 1: nan" in out


def test_a_real_fit_stops_at_the_first_non_finite_loss():
    model = make_model()
    x = np.ones((128, 4), dtype="float32")
    x[70] = np.inf  # batch 2 (of 32) holds an infinite input
    cb = fk.SyncTerminateOnNaN(communicator=LOCAL, verbose=0)
    model.fit(x, np.ones((128, 1), "float32"), batch_size=32, epochs=3, verbose=0, callbacks=[cb])
    assert cb.stopped_batch == (0, 2)
