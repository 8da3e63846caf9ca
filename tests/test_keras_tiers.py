"""Two checkpoint tiers: ChiefModelCheckpoint(local_directory=) commits to a fast root and
copies each step into the durable root in the background; restore_latest takes the
newest step that verifies on either (crashes between the tiers: test_storage_crash.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402
from test_keras_restore import EpochWeights, assert_holds  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError, ForgeDistError  # noqa: E402
from forge_dist.storage import CheckpointStore, _faults  # noqa: E402


def tiered(durable, local, **kw):
    return fk.ChiefModelCheckpoint(
        str(durable), local_directory=str(local), communicator=LOCAL, **kw
    )


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_step_becomes_durable_and_each_tier_keeps_its_own(tmp_path):
    durable, local = tmp_path / "durable", tmp_path / "local"
    seen = EpochWeights()
    ckpt = tiered(durable, local, keep_last=3, local_keep_last=1)
    fit(make_model(), [ckpt, seen], epochs=4)
    d, loc = CheckpointStore(str(durable)), CheckpointStore(str(local))
    assert d.steps() == [8, 12, 16] and loc.steps() == [16]
    assert ckpt.replicator.durable_steps == [4, 8, 12, 16]
    for step in d.steps():
        assert d.verify(step).ok
    # The durable copy is the same checkpoint: same files, same state, same run.
    a, b = d.get(16).manifest, loc.get(16).manifest
    assert (a.files, a.state, a.run, a.created) == (b.files, b.state, b.run, b.created)
    # From either tier alone: the last epoch's weights and optimizer state.
    for where in (
        {"directory": str(durable)},
        {"directory": str(tmp_path / "gone"), "local_directory": str(local)},
    ):
        fresh = make_model(seed=11)
        assert fk.restore_latest(fresh, communicator=LOCAL, **where).step == 16
        assert_holds(fresh, seen.weights[3], seen.optimizer[3])


def test_the_local_tier_never_deletes_a_step_that_is_not_durable(tmp_path):
    """The copy of step 4 is held (a real thread blocked at its commit point) while
    steps 8 and 12 are committed locally: local_keep_last=1 must keep all three."""
    durable, local = tmp_path / "durable", tmp_path / "local"
    release, reached = threading.Event(), threading.Event()

    def hook(name):
        if name == "before-manifest" and threading.current_thread().name.endswith(" 4"):
            reached.set()
            assert release.wait(60)

    class Checker(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                seen_local.extend(CheckpointStore(str(local)).steps())
                seen_durable.extend(CheckpointStore(str(durable)).steps())
                release.set()

    seen_local, seen_durable = [], []
    ckpt = tiered(durable, local, local_keep_last=1)
    _faults.hook = hook
    try:
        fit(make_model(), [ckpt, Checker()], epochs=4)
    finally:
        _faults.hook = None
        release.set()
    assert reached.is_set()
    assert seen_durable == [] and seen_local == [4, 8, 12]
    assert CheckpointStore(str(local)).steps() == [16]
    assert CheckpointStore(str(durable)).steps() == [4, 8, 12, 16]


def test_restore_takes_the_newest_step_that_verifies_on_either_tier(tmp_path):
    durable, local = tmp_path / "durable", tmp_path / "local"
    seen = EpochWeights()
    fit(make_model(), [tiered(durable, local, local_keep_last=None), seen], epochs=3)
    d = CheckpointStore(str(durable))
    # Not durable yet: step 12 is only on the local tier (the copy never happened).
    d.delete(12)
    fresh = make_model(seed=11)
    r = fk.restore_latest(fresh, str(durable), communicator=LOCAL, local_directory=str(local))
    assert r.step == 12 and r.read_from == f"{local} (the local tier)"
    assert_holds(fresh, seen.weights[2], seen.optimizer[2])
    # Requeued onto another node: its local folder is empty, the durable tier has 8.
    fresh = make_model(seed=11)
    r = fk.restore_latest(
        fresh, str(durable), communicator=LOCAL, local_directory=str(tmp_path / "other")
    )
    assert r.step == 8 and r.read_from == str(durable)
    assert_holds(fresh, seen.weights[1], seen.optimizer[1])
    # A damaged local copy of step 8 falls back to the durable copy of that step.
    CheckpointStore(str(local)).delete(12)
    flip_a_byte(local / "step-00000008" / "model.keras")
    fresh = make_model(seed=11)
    r = fk.restore_latest(fresh, str(durable), communicator=LOCAL, local_directory=str(local))
    assert r.step == 8 and r.skipped == [f"step-00000008 (in {local})"]
    assert r.read_from == str(durable)
    assert_holds(fresh, seen.weights[1], seen.optimizer[1])


def test_a_resumed_job_copies_what_was_not_durable_and_goes_on(tmp_path, capsys):
    durable, local = tmp_path / "durable", tmp_path / "local"
    seen = EpochWeights()
    fit(make_model(), [tiered(durable, local, local_keep_last=None), seen], epochs=2)
    CheckpointStore(str(durable)).delete(8)  # killed before step 8 became durable
    model = make_model(seed=11)
    r = fk.restore_latest(model, str(durable), communicator=LOCAL, local_directory=str(local))
    assert r.step == 8
    ckpt = tiered(durable, local, local_keep_last=None, verbose=1)
    fit(model, [ckpt], epochs=3, initial_epoch=r.initial_epoch)
    assert "step 8 in" in capsys.readouterr().out
    assert ckpt.replicator.durable_steps == [8, 12]
    assert CheckpointStore(str(durable)).steps() == [4, 8, 12]


def test_a_failed_copy_is_an_error_and_the_step_stays_local(tmp_path):
    durable, local = tmp_path / "durable", tmp_path / "local"

    def hook(name):
        if name == "copy:4":
            # The local step is damaged while it is copied: the copy must refuse it.
            flip_a_byte(local / "step-00000004" / "model.keras")

    _faults.hook = hook
    try:
        with pytest.raises(ForgeDistError, match="copying a checkpoint .* failed"):
            fit(make_model(), [tiered(durable, local, local_keep_last=1)], epochs=3)
    finally:
        _faults.hook = None
    assert CheckpointStore(str(durable)).steps() == []  # nothing unverified became durable
    assert 4 in CheckpointStore(str(local)).steps()  # and it was not deleted locally


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"local_directory": ""}, "local_directory must be a non-empty string"),
        ({"local_keep_last": 0}, "local_keep_last"),
        ({"local_directory": "SAME"}, "is the checkpoint directory itself"),
        ({"filepath": "m.keras", "local_directory": "x"}, "local_directory applies to"),
    ],
)
def test_bad_tier_arguments_fail_at_construction(tmp_path, kw, match):
    kw = dict(kw)
    if kw.get("local_directory") == "SAME":
        kw["local_directory"] = str(tmp_path / "d") + "/"
    kw.setdefault("local_directory", str(tmp_path / "l"))
    if "filepath" not in kw:
        kw["directory"] = str(tmp_path / "d")
    else:
        kw["filepath"] = str(tmp_path / kw["filepath"])
    with pytest.raises(ConfigurationError, match=match):
        fk.ChiefModelCheckpoint(communicator=LOCAL, **kw)
    with pytest.raises(ConfigurationError, match="local_directory must be"):
        fk.restore_latest(make_model(), str(tmp_path / "d"), communicator=LOCAL, local_directory=3)
    assert not np.any([p.exists() for p in (tmp_path / "d", tmp_path / "l")])


def test_a_bucket_as_the_durable_tier(tmp_path, s3):
    """The durable root on S3 (moto on 127.0.0.1): copies are committed manifest last
    under the run's writer lease; a job on another node resumes from the bucket."""
    url = f"s3://{s3.bucket}/tiers-{tmp_path.name}"
    options = {k: v for k, v in s3.options.items() if k != "skip_instance_cache"}
    local = tmp_path / "local"
    seen = EpochWeights()
    ckpt = fk.ChiefModelCheckpoint(
        url, local_directory=str(local), storage_options=options, communicator=LOCAL
    )
    fit(make_model(), [ckpt, seen], epochs=2)
    bucket = CheckpointStore(url, options)
    assert bucket.steps() == [4, 8] and all(bucket.verify(s).ok for s in (4, 8))
    assert bucket.lease().run == ckpt.run["id"]
    fresh = make_model(seed=11)
    r = fk.restore_latest(
        fresh,
        url,
        storage_options=options,
        communicator=LOCAL,
        local_directory=str(tmp_path / "another-node"),
    )
    assert r.step == 8
    assert_holds(fresh, seen.weights[1], seen.optimizer[1])
