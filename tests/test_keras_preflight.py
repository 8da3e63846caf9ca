"""Pre-flight at train begin, before the first step: the checkpoint root is writable and
has room for what retention keeps plus one checkpoint (real tmpfs mounts, as root)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, Steps, fit, make_model  # noqa: E402
from mounts import tmpfs  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import StorageError  # noqa: E402
from forge_dist.keras.preflight import checkpoint_bytes  # noqa: E402
from forge_dist.policy import Retention  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402


def test_a_read_only_root_fails_before_the_first_step(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as mnt:
        steps = Steps()
        cb = fk.ChiefModelCheckpoint(str(mnt / "run"), communicator=LOCAL)
        with pytest.raises(StorageError, match="not writable: read-only filesystem"):
            fit(make_model(), [cb, steps], epochs=1)
        assert steps.batches == 0


def test_too_little_space_names_the_need_and_what_is_free(tmp_path):
    model = make_model(units=4096)  # ~ 300 kB of variables and Adam slots
    one = checkpoint_bytes(model)
    with tmpfs(tmp_path / "small", "1m") as mnt:
        steps = Steps()
        cb = fk.ChiefModelCheckpoint(str(mnt / "run"), keep_last=5, communicator=LOCAL)
        with pytest.raises(StorageError, match=r"has .* free, but keeping 5 checkpoint") as err:
            fit(model, [cb, steps], epochs=1)
        assert steps.batches == 0 and str(mnt) in str(err.value)
        assert (Retention(keep_last=5).most_kept + 1) * one > 1024 * 1024  # the premise
        # With room for what is kept, it trains and saves; the estimate was not low.
        fit(model, [fk.ChiefModelCheckpoint(str(mnt / "run2"), keep_last=1, communicator=LOCAL)])
        saved = CheckpointStore(str(mnt / "run2")).newest().manifest.total_bytes
        assert saved <= one < 2 * saved


def test_the_estimate_counts_model_and_optimizer_variables():
    model = make_model(units=4)
    model.optimizer.build(model.trainable_variables)
    n = sum(int(w.size) for w in model.get_weights())
    assert checkpoint_bytes(model) >= 4 * 3 * n  # weights + Adam's two slots, float32
