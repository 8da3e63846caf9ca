"""ChiefCSVLogger: one CSV, written by the chief, on disk or in a bucket."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_csv_logger_appends_without_duplicating_epochs(tmp_path):
    url = str(tmp_path / "log" / "history.csv")
    model = make_model()
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=3)
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=4, initial_epoch=2)
    with open(url) as f:
        lines = f.read().splitlines()
    assert lines[0].split(",")[0] == "epoch"
    assert [ln.split(",")[0] for ln in lines[1:]] == ["0", "1", "2", "3"]


def test_csv_logger_writes_to_object_storage(s3):
    url = f"s3://{s3.bucket}/csv/history.csv"
    opts = {k: v for k, v in s3.options.items() if k != "skip_instance_cache"}
    fit(make_model(), [fk.ChiefCSVLogger(url, storage_options=opts, communicator=LOCAL)], epochs=2)
    import fsspec

    text = fsspec.open(url, "r", **opts).open().read()
    assert text.count("\n") == 3
