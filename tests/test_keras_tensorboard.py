"""ChiefTensorBoard in one process: Keras' scalar layout, steps that survive a resume,
a URL mirrored file by file, logs cut back to the checkpoint on resume."""

from __future__ import annotations

import os

import numpy as np
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


def events(folder):
    """Every summary value in the event files under ``folder``: (step, tag, plugin,
    value)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    values = []
    for d, _, fs in os.walk(folder):
        for f in sorted(fs):
            for ev in EventFileLoader(os.path.join(d, f)).Load():
                for v in ev.summary.value:
                    data = tensor_util.make_ndarray(v.tensor) if v.HasField("tensor") else None
                    values.append((ev.step, v.tag, v.metadata.plugin_data.plugin_name, data))
    return values


def test_keras_histograms_and_graph_are_written_too(tmp_path):
    log_dir = tmp_path / "tb"
    tb = fk.ChiefTensorBoard(str(log_dir), histogram_freq=1, communicator=LOCAL)
    model = make_model()
    fit(model, [tb], epochs=2)
    found = events(log_dir / "train")
    hists = {(step, tag): data for step, tag, plugin, data in found if plugin == "histograms"}
    paths = [w.path for w in model.weights]
    assert sorted(hists) == sorted((e, f"{p}/histogram") for e in (0, 1) for p in paths)
    for w in model.weights:  # the last epoch's histograms are of the final weights
        buckets = hists[(1, f"{w.path}/histogram")]  # rows: left edge, right edge, count
        values = np.asarray(w.numpy()).ravel()
        assert buckets[:, 2].sum() == values.size
        assert buckets[0, 0] <= values.min() and values.max() <= buckets[-1, 1]
    (graph,) = [data for _, tag, _, data in found if tag == "keras"]
    assert b'"class_name": "Sequential"' in graph.item()  # Keras' own graph summary


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
