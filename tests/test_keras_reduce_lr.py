"""SyncReduceLROnPlateau: Keras' semantics, one learning rate for all."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_plateau_sets_and_logs_the_learning_rate(tmp_path):
    model = make_model(lr=0.05)
    cb = fk.SyncReduceLROnPlateau(
        monitor="loss", patience=0, factor=0.5, min_delta=10.0, communicator=LOCAL
    )
    h = fit(model, [cb], epochs=3)
    # Epoch 0 sets the first "best"; every later epoch misses it by min_delta and, with
    # patience 0, halves the rate (Keras' semantics).
    assert h.history["learning_rate"] == pytest.approx([0.05, 0.025, 0.0125])
