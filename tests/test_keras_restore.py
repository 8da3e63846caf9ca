"""restore_latest in one process (resumes under launchers: test_e2e_*.py)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_restore_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    root = tmp_path / "r"
    model = make_model()
    fit(model, [fk.ChiefModelCheckpoint(str(root), communicator=LOCAL)], epochs=2)
    newest = root / "step-00000008" / "model.keras"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    fresh = make_model()
    with caplog.at_level("WARNING"):
        r = fk.restore_latest(fresh, str(root), communicator=LOCAL)
    assert r.step == 4 and r.skipped == ["step-00000008"] and r.initial_epoch == 1
    assert any("step-00000008" in m for m in caplog.messages)


def test_restore_with_nothing_saved_is_a_fresh_start(tmp_path):
    r = fk.restore_latest(make_model(), str(tmp_path / "none"), communicator=LOCAL)
    assert not r.restored and r.initial_epoch == 0
