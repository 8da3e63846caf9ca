"""ChiefCSVLogger: one CSV, written by the chief, on disk or in a bucket; a failure is an
error on every rank; a resume keeps exactly one row per epoch."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402
from threadcomm import run_ranks  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError, ForgeDistError, StorageError  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402


def epochs_in(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0].split(",")[0] == "epoch"
    return [ln.split(",")[0] for ln in lines[1:]]


def test_csv_logger_appends_without_duplicating_epochs(tmp_path):
    url = str(tmp_path / "log" / "history.csv")
    model = make_model()
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=3)
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=4, initial_epoch=2)
    assert epochs_in(url) == ["0", "1", "2", "3"]


def test_a_resume_drops_the_rows_past_the_checkpoint(tmp_path):
    url, root = str(tmp_path / "history.csv"), str(tmp_path / "ckpt")
    model = make_model()
    fit(
        model,
        [
            fk.ChiefCSVLogger(url, communicator=LOCAL),
            fk.ChiefModelCheckpoint(root, communicator=LOCAL),
        ],
        epochs=2,
    )
    assert CheckpointStore(root).newest().state["callbacks"]["csv_logger"] == {"last_epoch": 1}
    # The run went on past its last checkpoint (epochs 2, 3 logged) and died.
    fit(model, [fk.ChiefCSVLogger(url, communicator=LOCAL)], epochs=4, initial_epoch=2)
    fresh = make_model()
    restored = fk.restore_latest(fresh, root, communicator=LOCAL, verbose=0)
    fit(
        fresh,
        [fk.ChiefCSVLogger(url, communicator=LOCAL)],
        epochs=3,
        initial_epoch=restored.initial_epoch,
    )
    assert epochs_in(url) == ["0", "1", "2"]  # epoch 3 of the lost attempt is gone


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
