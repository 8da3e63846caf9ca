"""ChiefCSVLogger: one CSV, written by the chief, on disk or in a bucket; a failure is an
error on every rank; a resume keeps exactly one row per epoch."""

from __future__ import annotations

import csv

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, X, Y, fit, make_model  # noqa: E402
from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError, ForgeDistError, StorageError  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402

XY = (X, Y)


def epochs_in(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0].split(",")[0] == "epoch"
    return [ln.split(",")[0] for ln in lines[1:]]


def test_append_follows_keras_a_fresh_fit_replaces_or_adds_rows(tmp_path):
    url = str(tmp_path / "log" / "history.csv")
    model = make_model()
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=3)
    assert epochs_in(url) == ["0", "1", "2"]
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=2)  # append=False
    assert epochs_in(url) == ["0", "1"], "replaced, as Keras does by default"
    logger = fk.ChiefCSVLogger(url, append=True, communicator=LOCAL)
    fit(model, [logger], epochs=4, initial_epoch=2)
    fit(model, [logger], epochs=1)  # the same logger object in another fit
    assert epochs_in(url) == ["0", "1", "2", "3", "0"], "appending never drops a row"


def test_a_fit_refused_at_train_begin_keeps_the_rows_there(tmp_path):
    url = str(tmp_path / "history.csv")
    fit(make_model(), [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=2)
    before = (tmp_path / "history.csv").read_text()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the checkpoint root should be")
    logger = fk.ChiefCSVLogger(url, communicator=LOCAL)  # append=False: replaces...
    ckpt = fk.ChiefModelCheckpoint(str(blocker / "ckpt"), communicator=LOCAL)
    with pytest.raises(StorageError):  # ...but the fit never starts
        fit(make_model(), [logger, ckpt], epochs=2)
    assert (tmp_path / "history.csv").read_text() == before


def test_a_missing_value_is_na_as_in_keras(tmp_path):
    url = str(tmp_path / "h.csv")
    model = make_model()
    model.fit(
        *XY,
        validation_data=XY,
        validation_freq=2,
        epochs=2,
        verbose=0,
        callbacks=[fk.ChiefCSVLogger(url, communicator=LOCAL)],
    )
    with open(url) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["val_loss"] == "NA" and rows[1]["val_loss"] != "NA"


@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("order", ["csv-first", "checkpoint-first"])
def test_a_resume_drops_the_rows_past_the_checkpoint(tmp_path, append, order):
    url, root = str(tmp_path / "history.csv"), str(tmp_path / "ckpt")
    with open(url, "w") as f:  # rows of an earlier run in the same file
        f.write("epoch,loss\n0,9.0\n1,8.0\n2,7.0\n")

    def stack():
        logger = fk.ChiefCSVLogger(url, append=append, communicator=LOCAL)
        ckpt = fk.ChiefModelCheckpoint(root, communicator=LOCAL)
        return [logger, ckpt] if order == "csv-first" else [ckpt, logger]

    model = make_model()
    fit(model, stack(), epochs=2)
    earlier = 3 if append else 0
    assert epochs_in(url) == ["0", "1", "2"][:earlier] + ["0", "1"]
    # The run went on past its last checkpoint (epochs 2, 3 logged) and died.
    fit(model, [fk.ChiefCSVLogger(url, append=True, communicator=LOCAL)], epochs=4, initial_epoch=2)
    fresh = make_model()
    restored = fk.restore_latest(fresh, root, communicator=LOCAL, verbose=0)
    fit(fresh, stack(), epochs=3, initial_epoch=restored.initial_epoch)
    # Epochs 2 and 3 of the lost attempt are gone, epoch 2 is there once, and the earlier
    # run's rows are kept whatever append says: a resume is not a fresh fit.
    assert epochs_in(url) == ["0", "1", "2"][:earlier] + ["0", "1", "2"]


def test_the_checkpoint_records_how_far_the_csv_goes(tmp_path):
    url, root = str(tmp_path / "history.csv"), str(tmp_path / "ckpt")
    stack = [
        fk.ChiefCSVLogger(url, communicator=LOCAL),
        fk.ChiefModelCheckpoint(root, communicator=LOCAL),
    ]
    fit(make_model(), stack, epochs=2)
    state = CheckpointStore(root).newest().state["callbacks"]["csv_logger[history.csv]"]
    assert state == {"last_epoch": 1, "rows": 2}


def test_csv_logger_writes_to_object_storage(s3):
    url = f"s3://{s3.bucket}/csv/history.csv"
    opts = {k: v for k, v in s3.options.items() if k != "skip_instance_cache"}
    fit(make_model(), [fk.ChiefCSVLogger(url, storage_options=opts, communicator=LOCAL)], epochs=2)
    import fsspec

    text = fsspec.open(url, "r", **opts).open().read()
    assert text.count("\n") == 3


def test_kerass_filename_is_accepted(tmp_path):
    url = str(tmp_path / "h.csv")
    assert fk.ChiefCSVLogger(filename=url, communicator=LOCAL).url == url
    with pytest.raises(ConfigurationError, match="not both"):
        fk.ChiefCSVLogger(url, filename=url + "x", communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="required"):
        fk.ChiefCSVLogger(communicator=LOCAL)


def test_a_write_failure_is_an_error_on_every_rank_in_that_epoch(tmp_path):
    folder = tmp_path / "csv"

    def rank_fn(comm):
        model = make_model()
        logger = fk.ChiefCSVLogger(str(folder / "h.csv"), communicator=comm)
        logger.set_model(model)
        logger.on_train_begin()
        logger.on_epoch_end(0, {"loss": 1.0})
        if comm.is_chief:  # the folder goes away (a full or unmounted disk, say)
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
            folder.write_text("not a folder")
        comm.barrier()
        logger.on_epoch_end(1, {"loss": 0.5})

    results = run_ranks(2, rank_fn, timeout=30)
    assert isinstance(results[0], StorageError) and "cannot write the CSV" in str(results[0])
    assert isinstance(results[1], ForgeDistError) and "epoch 2" in str(results[1])


def test_an_unwritable_csv_folder_is_found_at_train_begin(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    logger = fk.ChiefCSVLogger(str(blocker / "h.csv"), communicator=LOCAL)
    with pytest.raises(StorageError, match="not writable"):
        fit(make_model(), [logger], epochs=1)
