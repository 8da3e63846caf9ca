"""``BackupAndRestore`` in a plain ``model.fit``: run the same fit again after an
interruption and it continues from the last epoch that ended, with every forge_dist
callback's state and the CSV cut back, ending exactly as a fit never interrupted."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402


class Interrupt(keras.callbacks.Callback):
    """Raises at the end of epoch ``at`` (after every other callback), as a crash would."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise RuntimeError("interrupted")


def stack(tmp_path, **backup):
    return [
        fk.BackupAndRestore(str(tmp_path / "backup"), communicator=LOCAL, **backup),
        fk.SyncEarlyStopping(
            monitor="val_loss",
            patience=2,
            min_delta=0.05,
            restore_best_weights=True,
            communicator=LOCAL,
        ),
        fk.SyncReduceLROnPlateau(monitor="val_loss", patience=1, factor=0.5, communicator=LOCAL),
        fk.ChiefCSVLogger(str(tmp_path / "log.csv"), communicator=LOCAL),
    ]


def run(tmp_path, interrupt_at=None, epochs=12, **backup):
    model = make_model(lr=0.2)
    cbs = stack(tmp_path, **backup)
    if interrupt_at is not None:
        with pytest.raises(RuntimeError, match="interrupted"):
            fit(model, [*cbs, Interrupt(interrupt_at)], epochs=epochs)
        model = make_model(lr=0.2)  # a new process: the script builds its model again
        cbs = stack(tmp_path, **backup)
    history = fit(model, cbs, epochs=epochs)
    lr = float(np.asarray(model.optimizer.learning_rate))
    return model, cbs, history, lr


def test_an_interrupted_fit_run_again_ends_as_one_never_interrupted(tmp_path):
    ref, ref_cbs, ref_hist, ref_lr = run(tmp_path / "a")
    model, cbs, hist, lr = run(tmp_path / "b", interrupt_at=3)
    assert hist.epoch[0] == 4  # it began after the last epoch that ended
    assert hist.history["val_loss"] == ref_hist.history["val_loss"][4:]
    pairs = zip(model.get_weights(), ref.get_weights(), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
    assert lr == ref_lr  # the plateau's state and the learning rate came back
    assert cbs[1].stopped_epoch == ref_cbs[1].stopped_epoch > 0
    assert cbs[1].best_epoch == ref_cbs[1].best_epoch
    a = (tmp_path / "a" / "log.csv").read_text()
    assert (tmp_path / "b" / "log.csv").read_text() == a  # one row per epoch
    assert not os.path.exists(tmp_path / "b" / "backup")  # removed: the fit ended


def test_double_checkpoint_falls_back_on_a_damaged_newest_backup(tmp_path):
    model = make_model()
    cbs = [fk.BackupAndRestore(str(tmp_path / "bk"), double_checkpoint=True, communicator=LOCAL)]
    with pytest.raises(RuntimeError):
        fit(model, [*cbs, Interrupt(2)], epochs=6)
    store = CheckpointStore(str(tmp_path / "bk"))
    assert len(store.steps()) == 2
    with open(cbs[0]._weights_path, "r+b") as f:
        f.write(b"damaged")
    again = make_model()
    hist = fit(again, [fk.BackupAndRestore(str(tmp_path / "bk"), communicator=LOCAL)], epochs=6)
    assert hist.epoch[0] == 2  # from the end of epoch 2 (1-based), the older backup


def test_backups_are_kept_when_asked_and_a_mid_epoch_one_is_passed_over(tmp_path, capsys):
    def cbs():
        return [
            fk.BackupAndRestore(
                str(tmp_path / "bk"), save_freq=3, delete_checkpoint=False, communicator=LOCAL
            )
        ]

    with pytest.raises(RuntimeError):
        fit(make_model(), [*cbs(), Interrupt(1)], epochs=3)  # 4 batches an epoch
    steps = CheckpointStore(str(tmp_path / "bk")).steps()
    assert steps == [6]  # batch 6 (epoch 2, mid-epoch); keep_last=1
    hist = fit(make_model(), cbs(), epochs=3)
    assert hist.epoch[0] == 0  # no backup at an epoch's end: from the start
    assert "passed over 1 step(s) taken mid-epoch" in capsys.readouterr().out
    assert CheckpointStore(str(tmp_path / "bk")).steps()  # kept: delete_checkpoint=False


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"backup_dir": ""}, "Empty `backup_dir` argument passed"),
        ({"backup_dir": "b", "save_freq": "batch"}, "Invalid value for argument `save_freq`"),
        ({"backup_dir": "b.keras"}, "a folder, not a Keras file path"),
    ],
)
def test_bad_arguments_in_kerass_words(kw, words):
    with pytest.raises(ConfigurationError, match=words.replace("`", ".")):
        fk.BackupAndRestore(communicator=LOCAL, **kw)
