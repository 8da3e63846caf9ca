"""ChiefTensorBoard in one process: Keras' scalar layout, steps that survive a resume,
a URL mirrored file by file, logs cut back to the checkpoint on resume."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")
pytest.importorskip("tensorboard", reason="tensorboard is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.keras.tb_events import scalar_values  # noqa: E402


def steps(values, tag):
    return [s for s, _ in values[tag]]


def test_epoch_and_batch_scalars_in_keras_layout(tmp_path):
    log_dir = tmp_path / "tb"
    tb = fk.ChiefTensorBoard(str(log_dir), update_freq=2, write_graph=False, communicator=LOCAL)
    h = fit(make_model(), [tb], epochs=2)  # 4 batches an epoch
    train = scalar_values(str(log_dir / "train"))
    val = scalar_values(str(log_dir / "validation"))
    assert steps(train, "epoch_loss") == [0, 1]
    assert [v for _, v in train["epoch_loss"]] == pytest.approx(h.history["loss"])
    assert [v for _, v in val["epoch_loss"]] == pytest.approx(h.history["val_loss"])
    assert steps(train, "batch_loss") == [2, 4, 6, 8]  # the optimizer's iterations
    assert steps(val, "evaluation_loss_vs_iterations") == [4, 8]


def test_keras_histograms_are_written_too(tmp_path):
    log_dir = tmp_path / "tb"
    tb = fk.ChiefTensorBoard(str(log_dir), histogram_freq=1, communicator=LOCAL)
    fit(make_model(), [tb], epochs=1)
    files = [f for _, _, fs in os.walk(log_dir / "train") for f in fs if "tfevents" in f]
    assert len(files) == 2  # forge_dist's scalars and Keras' histograms and graph


def test_a_resume_cuts_the_logs_back_to_the_checkpoint(tmp_path):
    root, log_dir = str(tmp_path / "ckpt"), str(tmp_path / "tb")

    def stack():
        return [
            fk.ChiefTensorBoard(
                log_dir, update_freq="batch", write_graph=False, communicator=LOCAL
            ),
            fk.ChiefModelCheckpoint(root, save_best_only=True, monitor="loss", communicator=LOCAL),
        ]

    model = make_model(lr=0.05)
    fit(model, stack(), epochs=3)
    # Pretend the run went on past its last checkpoint and died: one more epoch logged,
    # no checkpoint of it.
    model2 = make_model(lr=0.05)
    restored = fk.restore_latest(model2, root, communicator=LOCAL)
    last = restored.initial_epoch
    fit(
        model2,
        [fk.ChiefTensorBoard(log_dir, update_freq="batch", communicator=LOCAL)],
        epochs=last + 1,
        initial_epoch=last,
    )
    fresh = make_model(lr=0.05)
    restored = fk.restore_latest(fresh, root, communicator=LOCAL)
    fit(fresh, stack(), epochs=5, initial_epoch=restored.initial_epoch)
    train = scalar_values(os.path.join(log_dir, "train"))
    assert steps(train, "epoch_loss") == [0, 1, 2, 3, 4]  # one value per epoch
    assert steps(train, "batch_loss") == list(range(1, 21))  # one per iteration


def test_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ConfigurationError, match="update_freq"):
        fk.ChiefTensorBoard(str(tmp_path), update_freq=0, communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="histogram_freq"):
        fk.ChiefTensorBoard(str(tmp_path), histogram_freq=-1, communicator=LOCAL)


def test_an_s3_log_dir_receives_every_file_in_one_piece(s3, tmp_path):
    url = f"s3://{s3.bucket}/tb/{tmp_path.name}"
    tb = fk.ChiefTensorBoard(
        url, update_freq="batch", storage_options=s3.options, communicator=LOCAL
    )
    fit(make_model(), [tb], epochs=2)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **s3.options)
    names = fs.find(path)
    assert names and not [n for n in names if ".tmp-" in n or "probe" in n]
    local = tmp_path / "copy"
    fs.get(path, str(local), recursive=True)
    train = scalar_values(str(local / "train"))
    assert steps(train, "epoch_loss") == [0, 1]
    assert steps(train, "batch_loss") == list(range(1, 9))
    assert not os.path.exists(str(tmp_path / "tb"))  # nothing written beside the test
