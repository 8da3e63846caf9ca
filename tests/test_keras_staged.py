"""Saves streamed from a learned layout (forge_dist.keras.staged, .h5stream): the files
are what Keras writes, they load with Keras' own loaders, and models the layout cannot
map are saved the usual way."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

pytestmark = pytest.mark.keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")
h5py = pytest.importorskip("h5py")

import kerashelp  # noqa: E402
from kerashelp import LOCAL, X, Y  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.keras import staged  # noqa: E402
from forge_dist.keras.h5stream import DatasetSpec, Skeleton, stream_weights  # noqa: E402
from forge_dist.keras.saving import StagedSaves  # noqa: E402


def rich_model():
    """Functional, with batch norm (non-trainable variables), dropout, an int64 counter
    and a float64 layer: what a layout must place exactly."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((4,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.1)(h)
    h = keras.layers.Dense(8, dtype="float64")(h)
    out = keras.layers.Dense(1)(h)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    model.fit(X, Y, epochs=1, batch_size=32, verbose=0)
    return model


def h5_tree(f):
    """Every group's attributes and every dataset's shape, dtype and bytes."""
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out[name] = (obj.shape, obj.dtype.str, np.asarray(obj).tobytes())
        else:
            out[name] = dict(obj.attrs)

    f.visititems(visit)
    return out


def staged_archive(model, weights_only=False):
    snap = StagedSaves().live(model)
    assert snap is not None
    buf = io.BytesIO()
    snap.write(buf, weights_only)
    return buf.getvalue()


def test_the_weight_file_is_the_one_keras_writes(tmp_path):
    model = rich_model()
    model.save_weights(tmp_path / "keras.weights.h5")
    (tmp_path / "ours.weights.h5").write_bytes(staged_archive(model, weights_only=True))
    with (
        h5py.File(tmp_path / "keras.weights.h5") as theirs,
        h5py.File(tmp_path / "ours.weights.h5") as ours,
    ):
        expected, got = h5_tree(theirs), h5_tree(ours)
    assert any("optimizer" in k for k in expected)  # the optimizer's state is in it
    assert got == expected


def test_the_archive_loads_with_keras_and_holds_the_same_state(tmp_path):
    model = rich_model()
    path = tmp_path / "ours.keras"
    path.write_bytes(staged_archive(model))
    loaded = keras.models.load_model(path)
    mine = list(model.weights) + list(model.optimizer.variables)
    theirs = list(loaded.weights) + list(loaded.optimizer.variables)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(loaded.optimizer) is type(model.optimizer)
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))


def test_weights_only_files_load_into_a_fresh_model(tmp_path):
    model = rich_model()
    path = tmp_path / "ours.weights.h5"
    path.write_bytes(staged_archive(model, weights_only=True))
    fresh = rich_model()  # the same architecture, other values after its own step
    fresh.fit(X, Y + 1, epochs=1, verbose=0)
    fresh.load_weights(path)
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_model_with_assets_is_saved_the_usual_way(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((1,), dtype="string")
    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array([["a"], ["b"], ["c"]]))  # the vocabulary is an asset, not config
    ids = lookup(inp)
    out = keras.layers.Dense(1)(keras.layers.CategoryEncoding(5, output_mode="one_hot")(ids))
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="mse")
    saves = StagedSaves()
    assert saves.live(model) is None
    assert "assets" in saves.why_not
    ckpt = fk.ChiefModelCheckpoint(str(tmp_path), communicator=LOCAL)
    ckpt.set_model(model)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0, {"val_loss": 1.0})
    loaded = keras.models.load_model(tmp_path / "step-00000000" / "model.keras")
    (restored,) = [la for la in loaded.layers if isinstance(la, keras.layers.StringLookup)]
    assert restored.get_vocabulary() == lookup.get_vocabulary()  # the asset came back


def test_learning_leaves_keras_variables_as_they_were():
    model = rich_model()
    variables = staged.model_variables(model)
    classes = {type(v) for v in variables}
    methods = {c: c.__dict__.get("numpy") for c in classes}  # None: inherited
    before = [(v.dtype, v.numpy().copy()) for v in variables]
    staged.StagedLayout(model)
    assert {c: c.__dict__.get("numpy") for c in classes} == methods, "numpy() put back"
    for v, (dtype, value) in zip(variables, before, strict=True):
        now = v.numpy()  # the tag is gone again: the variable's own values, bit for bit
        assert type(now) is type(value) and now.dtype == value.dtype and v.dtype == dtype
        assert now.tobytes() == value.tobytes()


def test_a_recompiled_model_gets_a_new_layout(tmp_path):
    model = kerashelp.make_model()
    model.fit(X, Y, epochs=1, verbose=0)
    saves = StagedSaves()
    first = saves.layout(model)
    assert saves.layout(model) is first  # learned once
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    model.fit(X, Y, epochs=1, verbose=0)
    snap = saves.copy(model)
    assert snap.layout is not first
    path = tmp_path / "m.keras"
    with open(path, "wb") as f:
        snap.write(f, weights_only=False)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer).__name__ == "SGD"
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_async_snapshot_reuses_its_host_buffers(tmp_path):
    model = kerashelp.make_model()
    saves = StagedSaves()
    first = saves.copy(model)
    model.fit(X, Y, epochs=1, verbose=0)
    second = saves.copy(model)
    assert all(a is b for a, b in zip(first.arrays, second.arrays, strict=True))
    live = [np.asarray(v) for v in staged.model_variables(model)]
    by_var = dict(zip(map(id, second.layout.variables), second.arrays, strict=True))
    for v, value in zip(staged.model_variables(model), live, strict=True):
        np.testing.assert_array_equal(by_var[id(v)], value)
        assert not np.shares_memory(by_var[id(v)], value)


def test_a_skeleton_refuses_arrays_of_another_size(tmp_path):
    spec = [DatasetSpec("vars", "0", 0, (3,), "<f4")]
    skeleton = Skeleton.build([("vars", {"name": "x"})], spec)
    out = io.BytesIO()
    stream_weights(out.write, skeleton, [np.arange(3, dtype="<f4")])
    with h5py.File(io.BytesIO(out.getvalue())) as f:
        np.testing.assert_array_equal(f["vars/0"][()], [0, 1, 2])
        assert f["vars"].attrs["name"] == "x"
    with pytest.raises(ValueError, match="16 bytes of a 12-byte dataset"):
        stream_weights(io.BytesIO().write, skeleton, [np.arange(4, dtype="<f4")])
