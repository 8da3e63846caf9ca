"""Restore what you mean: a step by number, the newest epoch end, a directory that does
not exist (said; an error for a restarted job), a step folder given as the root, and a
mid-epoch checkpoint of another rank count refused before anything is restored."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.policy import Retention  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402


class Weights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.at = {}

    def on_epoch_end(self, epoch, logs=None):
        self.at[epoch] = [np.array(w) for w in self.model.get_weights()]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def root(tmp_path):
    """Four epoch-end checkpoints (steps 4, 8, 12, 16) and the weights of each epoch."""
    record = Weights()
    path = str(tmp_path / "r")
    fit(make_model(), [fk.ChiefModelCheckpoint(path, communicator=LOCAL), record], epochs=4)
    return path, record.at


def test_a_step_by_number(root, capsys):
    path, weights = root
    model = make_model(seed=8)
    restored = fk.restore_latest(model, path, communicator=LOCAL, step=8)
    assert (restored.step, restored.initial_epoch) == (8, 2)
    assert same(model.get_weights(), weights[1])
    assert "resumed from step 8" in capsys.readouterr().out
    with pytest.raises(
        ConfigurationError, match=r"no committed step 9 .*steps there: 4, 8, 12, 16"
    ):
        fk.restore_latest(make_model(), path, communicator=LOCAL, step=9)
    os.truncate(os.path.join(path, "step-00000012", "model.keras"), 10)
    with pytest.raises(ConfigurationError, match="step 12 in .* is damaged"):
        fk.restore_latest(make_model(), path, communicator=LOCAL, step=12)


def test_a_directory_that_does_not_exist_is_said_and_an_error_after_a_restart(
    tmp_path, capsys, monkeypatch
):
    missing = str(tmp_path / "runs" / "does-not-exist")
    restored = fk.restore_latest(make_model(), missing, communicator=LOCAL)
    assert not restored.restored
    assert "does not exist yet): training from the start" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(ConfigurationError, match="restarted .* does not exist on ") as info:
        fk.restore_latest(make_model(), missing, communicator=LOCAL)
    assert "allow_fresh_start=True" in str(info.value)
    # A folder made beforehand (`mkdir -p` in a job script) holds no trace of a run.
    os.makedirs(missing)
    with pytest.raises(ConfigurationError, match="restarted .* holds no trace of a run"):
        fk.restore_latest(make_model(), missing, communicator=LOCAL)
    capsys.readouterr()
    assert not fk.restore_latest(
        make_model(), missing, communicator=LOCAL, allow_fresh_start=True
    ).restored
    said = capsys.readouterr().out
    assert "(it holds no step and no writer ever took it): training from the start" in said
    assert "does not exist" not in said, "the folder is there"
    monkeypatch.setenv("FORGE_DIST_ALLOW_FRESH_START", "1")
    assert not fk.restore_latest(make_model(), missing, communicator=LOCAL).restored


def test_a_restarted_job_that_finds_an_ended_run_with_no_step_starts_over(tmp_path, monkeypatch):
    """The first attempt took the root (its lease is there) and died before its first
    checkpoint: nothing to resume, and starting over loses nothing."""
    path = str(tmp_path / "r")
    CheckpointStore(path).take_lease("first-attempt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert not fk.restore_latest(make_model(), path, communicator=LOCAL).restored


def test_a_node_local_root_is_named_as_the_likely_cause(tmp_path, monkeypatch):
    from forge_dist._launch import mount_of

    mounts = "proc /proc proc rw 0 0\n/dev/vda / ext4 rw 0 0\nfs:/x /shared nfs4 rw 0 0\n"
    assert mount_of("/shared/run/a", mounts) == ("nfs4", "/shared")
    assert mount_of("/sharedx/run", mounts) == ("ext4", "/")
    kind = mount_of(str(tmp_path))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(ConfigurationError) as info:
        fk.restore_latest(make_model(), str(tmp_path / "gone"), communicator=LOCAL)
    said = str(info.value)
    assert "SLURM_RESTART_COUNT=2" in said and "(the chief)" in said
    assert f"It is on {kind[0]} (mounted at {kind[1]}), local to this node" in said


def test_a_step_folder_given_as_the_root_names_the_root(root):
    path, _ = root
    with pytest.raises(ConfigurationError, match=r"one checkpoint folder, not a checkpoint root"):
        fk.restore_latest(make_model(), os.path.join(path, "step-00000008"), communicator=LOCAL)


def test_a_mid_epoch_step_of_two_ranks_is_refused_on_one_before_anything_is_restored(
    root, tmp_path
):
    path, weights = root
    # A preemption save of a 2-rank job, each rank on its own data: epoch 5, batch 3.
    saved = tmp_path / "m.keras"
    other = make_model(seed=5)
    other.optimizer.build(other.trainable_variables)
    other.save(saved)
    state = {"epoch": 4, "epoch_done": False, "batch": 2, "world_size": 2, "step": 19}
    store = CheckpointStore(path)
    run = store.get(16).manifest.run
    with store.writer(19, state=state, run=run) as w:
        w.add_file("model.keras", str(saved))
    model = make_model(seed=8)
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(ConfigurationError, match="epoch_end_only=True") as info:
        fk.restore_latest(model, path, communicator=LOCAL)
    assert "saved mid-epoch by 2 rank(s)" in str(info.value)
    assert same(model.get_weights(), before)  # nothing restored
    restored = fk.restore_latest(model, path, communicator=LOCAL, epoch_end_only=True)
    assert restored.step == 16 and same(model.get_weights(), weights[3])


def test_retention_lets_a_mid_epoch_step_go_once_a_later_epoch_ended(tmp_path):
    store = CheckpointStore(str(tmp_path / "r"))
    plan = [(4, 0, True, 0.5), (7, 1, False, None), (8, 1, True, 0.4), (11, 2, False, None)]
    for step, epoch, done, val in plan:
        metrics = {"loss": 1.0, **({"val_loss": val} if val is not None else {})}
        state = {"epoch": epoch, "epoch_done": done}
        with store.writer(step, metrics=metrics, state=state) as w:
            w.add_bytes("f", b"x")
    kept, deleted = store.apply_retention(Retention(keep_last=1, keep_best=1, monitor="val_loss"))
    # 7 (mid-epoch, epoch 2 has ended since) goes; 11 (mid-epoch, newest) stays.
    assert kept == [8, 11] and deleted == [4, 7]
