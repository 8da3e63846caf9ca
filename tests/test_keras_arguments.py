"""Every callback refuses a bad argument at construction, on every rank."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import (  # noqa: E402
    BackendNotInstalledError,
    ConfigurationError,
)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: fk.SyncEarlyStopping(patience=-1, communicator=LOCAL), "patience"),
        (lambda: fk.SyncEarlyStopping(mode="best", communicator=LOCAL), "mode must be"),
        (lambda: fk.SyncEarlyStopping(monitor=3, communicator=LOCAL), "monitor"),
        (lambda: fk.SyncReduceLROnPlateau(factor=2.0, communicator=LOCAL), "factor"),
        (lambda: fk.SyncReduceLROnPlateau(cooldown=-1, communicator=LOCAL), "cooldown"),
        (lambda: fk.ChiefModelCheckpoint("/tmp/x", save_freq=0, communicator=LOCAL), "save_freq"),
        (lambda: fk.ChiefModelCheckpoint("/tmp/x", keep_last=0, communicator=LOCAL), "keep_last"),
        (lambda: fk.ConsistencyGuard(on_mismatch="ignore", communicator=LOCAL), "on_mismatch"),
        (lambda: fk.BroadcastInitialState(root=3, communicator=LOCAL), "root"),
        (lambda: fk.ChiefCSVLogger("", communicator=LOCAL), "url"),
    ],
)
def test_bad_arguments_fail_at_construction(factory, message):
    with pytest.raises(ConfigurationError, match=message):
        factory()


def test_a_missing_storage_backend_fails_at_construction(without_gcsfs):
    with pytest.raises(BackendNotInstalledError, match=r"forge-dist\[gcs\]"):
        fk.ChiefModelCheckpoint("gs://bucket/run", communicator=LOCAL)
