"""Coordinated preemption in Keras: a signal sets a flag, the ranks agree at a batch
boundary, the chief saves once, every rank exits with 75, and a resumed run ends where an
uninterrupted one does. In one process and under mpirun here; under SLURM in
test_e2e_slurm.py."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from forge_dist.errors import ConfigurationError
from forge_dist.preemption import PREEMPTED_EXIT_CODE, Preempted

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------- Keras, one process
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")
from forge_dist import keras as fk  # noqa: E402
from forge_dist.comm import LocalCommunicator  # noqa: E402
from forge_dist.keras import _compat  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402

LOCAL = LocalCommunicator()
RNG = np.random.default_rng(1)
X = RNG.normal(size=(160, 4)).astype("float32")  # 10 batches of 16
Y = np.tanh(X @ np.array([[1.0], [-1.0], [0.5], [0.2]], dtype="float32")).astype("float32")
XV, YV = X[:48] + 0.3, Y[:48]


class SignalAt(keras.callbacks.Callback):
    """Sends this process ``sig`` at the end of (epoch, batch): a real signal."""

    def __init__(self, epoch: int, batch: int, sig=signal.SIGUSR1):
        super().__init__()
        self.at, self.sig, self.epoch = (epoch, batch), sig, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), self.sig)


def run(root, epochs=8, restored_from=None, extra=(), fit_verbose=0, **kw):
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    restored = None
    if restored_from:
        restored = fk.restore_latest(model, restored_from, communicator=LOCAL)
    options = dict(
        patience=3,
        reduce_lr_patience=1,
        communicator=LOCAL,
        verbose=0,
        preemption_check_every_n_batches=1,  # saved at the very batch signalled
    )
    cbs = fk.production_callbacks(str(root), **{**options, **kw})
    # The signal comes from "outside": before forge_dist's callbacks see the batch end.
    cbs = [*extra, *cbs]
    fk.fit_resumed(
        model,
        restored,
        X,
        Y,
        validation_data=(XV, YV),
        epochs=epochs,
        batch_size=16,
        verbose=fit_verbose,
        callbacks=cbs,
    )
    es = next(c for c in cbs if isinstance(c, fk.SyncEarlyStopping))
    return model, es


def csv_rows(root):
    with open(os.path.join(root, "history.csv")) as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "root"
    model, es = run(root)
    return _compat.weights_fingerprint(model.get_weights()), es.stopped_epoch, csv_rows(root)


@pytest.mark.keras
@pytest.mark.parametrize(
    "epoch, batch, expect_batch",
    [(2, 4, 4), (0, 0, 0), (3, 9, None)],  # mid-epoch; first batch; last batch: epoch end
)
def test_preempted_run_resumes_to_the_uninterrupted_result(
    tmp_path, uninterrupted, epoch, batch, expect_batch
):
    root = tmp_path / "root"
    old = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as info:
        run(root, extra=[SignalAt(epoch, batch)])
    stop = info.value
    assert stop.code == 75 and stop.signal_name == "SIGUSR1"
    assert (stop.epoch, stop.batch) == (epoch, expect_batch)
    assert signal.getsignal(signal.SIGUSR1) == old  # the handlers are put back
    store = CheckpointStore(str(root))
    newest = store.newest()
    assert newest.step == stop.step == epoch * 10 + batch + 1  # saved at once, that batch
    assert newest.state["epoch"] == epoch
    assert newest.state["epoch_done"] is (expect_batch is None)
    assert newest.state["batch"] == expect_batch
    assert store.verify(newest.step).ok
    fingerprint, stopped, rows = uninterrupted
    model, es = run(root, restored_from=str(root))
    assert _compat.weights_fingerprint(model.get_weights()) == fingerprint
    assert es.stopped_epoch == stopped
    # One row per epoch, and the interrupted epoch's training loss is the whole epoch's
    # (its running totals were saved with the batch position), to the last bit.
    assert csv_rows(root) == rows


@pytest.mark.keras
def test_decisions_on_the_training_loss_survive_a_mid_epoch_resume(tmp_path):
    kw = dict(monitor="loss", patience=1, min_delta=0.004, reduce_lr_patience=None)
    ref, _ = run(tmp_path / "ref", **kw)
    root = tmp_path / "root"
    with pytest.raises(Preempted):
        run(root, extra=[SignalAt(2, 4)], **kw)
    model, es = run(root, restored_from=str(root), **kw)
    assert csv_rows(root) == csv_rows(tmp_path / "ref")
    assert _compat.weights_fingerprint(model.get_weights()) == _compat.weights_fingerprint(
        ref.get_weights()
    )


@pytest.mark.keras
def test_a_signal_before_fit_is_held_and_ends_the_job_with_75_at_train_begin(tmp_path):
    from forge_dist.preemption import catch_early

    root = tmp_path / "root"
    run(root, epochs=2)  # a checkpoint to resume from
    flag = catch_early()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # during "imports" or the restore
        assert flag.raised
        with pytest.raises(Preempted) as info:
            run(root, epochs=4, restored_from=str(root))
    finally:
        flag.uninstall()
    stop = info.value
    assert stop.code == 75 and not stop.saved
    assert stop.step == CheckpointStore(str(root)).newest().step  # nothing new saved
    assert "nothing new to save" in str(stop) and "resume with" in str(stop)


@pytest.mark.keras
def test_a_second_preemption_during_the_resumed_partial_epoch(tmp_path, uninterrupted):
    root = tmp_path / "root"
    with pytest.raises(Preempted):
        run(root, extra=[SignalAt(1, 2)])
    # Preempted again 3 batches into the rest of epoch 2: the position counts from the
    # epoch's start, not from where the resumed fit began.
    with pytest.raises(Preempted) as info:
        run(root, restored_from=str(root), extra=[SignalAt(1, 2, signal.SIGTERM)])
    assert (info.value.epoch, info.value.batch, info.value.signal_name) == (1, 5, "SIGTERM")
    model, _ = run(root, restored_from=str(root))
    assert _compat.weights_fingerprint(model.get_weights()) == uninterrupted[0]
    assert csv_rows(root) == uninterrupted[2]


@pytest.mark.keras
def test_the_resumed_epochs_progress_bar_counts_as_the_whole_run(tmp_path, capsys):
    """Preempted after 3 of epoch 2's 10 batches: the resumed fit's bar says "Epoch 2/8"
    (not "Epoch 2/2") and ends that epoch at step 10/10 (not 7/7)."""
    root = tmp_path / "root"
    with pytest.raises(Preempted):
        run(root, extra=[SignalAt(1, 2)])
    capsys.readouterr()
    run(root, epochs=3, restored_from=str(root), fit_verbose=1)
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert epochs == ["Epoch 2/3", "Epoch 3/3"], out[-2000:]
    bars = out.split("Epoch 3/3")
    assert "10/10" in bars[0] and "7/7" not in bars[0], bars[0][-1500:]
    assert "10/10" in bars[1]


@pytest.mark.keras
def test_preemption_checkpoint_arguments_fail_at_construction(tmp_path):
    ckpt = fk.ChiefModelCheckpoint(str(tmp_path), communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="ChiefModelCheckpoint"):
        fk.PreemptionCheckpoint(str(tmp_path), communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="check_every_n_batches"):
        fk.PreemptionCheckpoint(ckpt, check_every_n_batches=0)
    with pytest.raises(ConfigurationError, match="exit_code"):
        fk.PreemptionCheckpoint(ckpt, exit_code=0)
    with pytest.raises(ConfigurationError, match="not a signal"):
        fk.PreemptionCheckpoint(ckpt, signals=["SIGWHAT"])


def notice_warnings(caplog) -> list[str]:
    return [m for m in caplog.messages if "cannot fit the save it asks for" in m]


@pytest.mark.keras
def test_a_notice_too_short_for_a_save_is_warned_once_and_at_a_resumes_train_begin(
    tmp_path, caplog, monkeypatch
):
    """A 1 ms notice (FORGE_DIST_PREEMPT_NOTICE_S, as the sbatch jobs set it) cannot fit
    a save: the chief warns once, after the first epoch's save was measured, naming the
    numbers. The measured saves travel in the checkpoint's state, so the resumed run
    warns at train begin, before it saves anything. An hour's notice says nothing."""
    monkeypatch.setenv("FORGE_DIST_PREEMPT_NOTICE_S", "0.001")
    with caplog.at_level("WARNING", logger="forge_dist.keras"):
        run(tmp_path / "a", epochs=3)
    said = notice_warnings(caplog)
    assert len(said) == 1, said
    assert "notice of 0.001 s" in said[0] and "(measured by epoch 1)" in said[0]
    assert "the p95 of 1 save(s) measured" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="forge_dist.keras"):
        run(tmp_path / "a", epochs=4, restored_from=str(tmp_path / "a"))
    said = notice_warnings(caplog)
    assert len(said) == 1, said
    assert "(from the saves of the attempts before this one)" in said[0]
    assert "the p95 of 2 save(s) measured" in said[0]  # epochs 1 and 2 (3's was saving)
    caplog.clear()
    monkeypatch.setenv("FORGE_DIST_PREEMPT_NOTICE_S", "3600")
    with caplog.at_level("WARNING", logger="forge_dist.keras"):
        run(tmp_path / "b", epochs=2)
    assert notice_warnings(caplog) == []


def test_a_notice_that_is_not_a_number_of_seconds_fails_at_construction(tmp_path, monkeypatch):
    ckpt = fk.ChiefModelCheckpoint(str(tmp_path), communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="notice_s must be a number of seconds > 0"):
        fk.PreemptionCheckpoint(ckpt, notice_s=0)
    monkeypatch.setenv("FORGE_DIST_PREEMPT_NOTICE_S", "2min")
    with pytest.raises(ConfigurationError, match="FORGE_DIST_PREEMPT_NOTICE_S must be .* '2min'"):
        fk.PreemptionCheckpoint(ckpt)
    assert fk.PreemptionCheckpoint(ckpt, notice_s=120).notice_s == 120.0


# ----------------------------------------------------------------- mpirun -np 2, kill -USR1
TRAIN = os.path.join(os.path.dirname(HERE), "scripts", "train.py")


def train_args(root, report, *extra, backend="mpi"):
    # 32 batches an epoch, no early stop: long enough to be signalled mid-run, and the
    # same number of epochs with or without a preemption.
    return [
        TRAIN,
        "--backend",
        backend,
        "--checkpoint-dir",
        str(root),
        "--epochs",
        "6",
        "--samples",
        "1024",
        "--patience",
        "100",
        "--report",
        str(report),
        *extra,
    ]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mpi", "horovod"])
def test_mpirun_kill_usr1_to_rank_1_only_saves_once_and_resumes_exactly(tmp_path, backend):
    """Under mpirun with the mpi4py backend, and with Horovod's (built with MPI), as
    slurm/train_mpi.sbatch and slurm/train_horovod.sbatch run them."""
    from multiproc import (
        Background,
        has_committed_step,
        mpirun,
        mpirun_cmd,
        pids_with,
        read_rank_reports,
        wait_until,
    )

    if backend == "horovod":
        pytest.importorskip("horovod.tensorflow", reason="Horovod is built by make setup")
    ref = tmp_path / "ref"
    run = mpirun(2, train_args(ref / "root", ref / "r{rank}.json", backend=backend), bound_s=240)
    assert run.returncode == 0, run.output[-3000:]
    expected = read_rank_reports(ref / "r{rank}.json")[0]["fingerprint"]

    root, report = tmp_path / "root", tmp_path / "r{rank}.json"
    job = Background(*mpirun_cmd(2, train_args(root, report, backend=backend)))
    wait_until(lambda: has_committed_step(root), 180, "first checkpoint", job)
    rank1 = pids_with(str(root), "OMPI_COMM_WORLD_RANK=1")
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGUSR1)  # rank 0 is not signalled
    done = job.wait(240)
    assert done.returncode == PREEMPTED_EXIT_CODE, done.output[-3000:]
    assert "(signalled: rank 1: SIGUSR1)" in done.output
    r0, r1 = read_rank_reports(report)
    assert r0["preempted"] == r1["preempted"] is not None  # same step, same batch
    assert r0["fingerprint"] == r1["fingerprint"]
    step = r0["preempted"]["step"]
    store = CheckpointStore(str(root))
    assert store.newest().step == step and store.verify(step).ok
    assert {c.manifest.writer["rank"] for c in store.list()} == {0}
    assert r1["touched_root"] == 0

    run = mpirun(2, train_args(root, report, "--resume", backend=backend), bound_s=240)
    assert run.returncode == 0, run.output[-3000:]
    r0, r1 = read_rank_reports(report)
    assert r0["resumed_step"] == step
    assert r0["fingerprint"] == r1["fingerprint"] == expected


@pytest.mark.keras
@pytest.mark.parametrize(
    "timing, expected",
    [
        ((0.4, 100, 0.02, 50), 10),  # 4 ms steps, 0.4 ms checks: every 10th batch is 1 %
        ((200.0, 100, 0.02, 50), 1),  # 2 s steps: a check costs nothing, check every batch
        ((50.0, 100, 50.0, 50), 20),  # 0.5 s steps, 1 s checks: still within 10 s
    ],
)
def test_auto_spacing_keeps_checks_cheap_and_prompt(tmp_path, timing, expected):
    cb = fk.PreemptionCheckpoint(fk.ChiefModelCheckpoint(str(tmp_path), communicator=LOCAL))
    cb._timing = list(timing)
    assert cb._propose_every() == expected


@pytest.mark.keras
def test_ranks_agree_on_the_largest_proposed_spacing(tmp_path):
    from threadcomm import run_ranks

    def rank_fn(comm):
        ckpt = fk.ChiefModelCheckpoint(str(tmp_path / "root"), communicator=comm)
        cb = fk.PreemptionCheckpoint(ckpt, communicator=comm)
        cb._timing = [0.4, 100, 0.02 * (1 + comm.rank), 50]  # rank 1's checks cost more
        cb._check(None, epoch_done=True)  # the epoch-end agreement, nobody signalled
        return cb.every

    assert run_ranks(2, rank_fn) == [20, 20]
