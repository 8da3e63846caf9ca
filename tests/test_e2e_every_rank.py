"""What the README promises "on every rank", in real processes under ``mpirun -np 2`` (the
thread tests of the same promises share Python objects between ranks): different metric
names, a failed CSV write, a failed background save on a full disk, ``when_busy="skip"``,
the weight guard's warn and repair, and TensorBoard's batch scalars averaged across
ranks. Each rank reports its own outcome."""

from __future__ import annotations

import os

import pytest
from mounts import tmpfs
from multiproc import HERE, mpirun, rank_output, read_rank_reports

from forge_dist.storage import CheckpointStore

pytestmark = [pytest.mark.mpi, pytest.mark.keras]
SCRIPT = os.path.join(HERE, "_every_rank.py")


def run_case(tmp_path, case, root=None):
    root = root or tmp_path / "root"
    out = str(tmp_path / "r{rank}.json")
    run = mpirun(
        2,
        [SCRIPT, case, str(root), out],
        {"FORGE_DIST_TIMEOUT": "60"},  # a rank left waiting fails well inside the bound
        bound_s=180,
        mpi_flags=["--output", "tag"],
    )
    assert run.returncode == 0, run.output[-4000:]
    return read_rank_reports(out), run.output


def test_different_metric_names_are_an_error_on_every_rank_in_the_first_epoch(tmp_path):
    reports, _ = run_case(tmp_path, "metric-names")
    for r in reports:
        assert r["error"] and r["error"].startswith("CollectiveMismatchError"), r
        assert "mae" in r["error"] and "rank 1" in r["error"], r["error"]
        assert r["epoch"] == 0 and r["epochs_ended"] == [], "before any epoch's decisions"


def test_a_failed_csv_write_is_an_error_on_every_rank_in_that_epoch(tmp_path):
    reports, _ = run_case(tmp_path, "csv-fail")
    chief, other = reports
    assert chief["error"].startswith("StorageError") and "cannot write the CSV" in chief["error"]
    assert other["error"].startswith("ForgeDistError") and "StorageError" in other["error"]
    assert "cannot write the CSV" in other["error"], other["error"]
    assert chief["epoch"] == other["epoch"] == 1
    assert chief["epochs_ended"] == other["epochs_ended"] == [0]


def test_a_background_save_on_a_full_disk_fails_on_every_rank_in_the_same_epoch(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as mnt:
        reports, _ = run_case(tmp_path, "async-fail", root=mnt)
        store = CheckpointStore(str(mnt / "ckpt"))
        assert store.steps() == [] and store.list_staging() == [], "nothing half-written kept"
    chief, other = reports
    assert chief["filled"] == 28  # ENOSPC, for real, after the pre-flight
    for r in reports:
        assert r["error"] and "background save of step 8 failed" in r["error"], r["error"]
        assert "no space left on device" in r["error"], r["error"]
        assert r["epoch"] == 1, "raised at the next epoch end, the same on both"
    assert other["error"].startswith("ForgeDistError") and "on rank 0" in other["error"]


def test_when_busy_skip_is_taken_on_every_rank_alike(tmp_path):
    reports, _ = run_case(tmp_path, "async-skip")
    chief, other = reports
    assert chief["held_at"], "the first background save was held"
    for r in reports:
        assert r["error"] is None, r["error"]
        assert r["saved_steps"] == [8, 24], r  # epoch 1's save skipped, on both ranks
    assert chief["fingerprint"] == other["fingerprint"]
    assert CheckpointStore(str(tmp_path / "root")).steps() == [8, 24]


@pytest.mark.parametrize("on_mismatch", ["warn", "repair"])
def test_the_guard_finds_a_desync_on_every_rank(tmp_path, on_mismatch):
    reports, output = run_case(tmp_path, f"guard-{on_mismatch}")
    chief, other = reports
    assert chief["error"] is None and other["error"] is None
    for rank in (0, 1):
        said = rank_output(output, rank)
        assert "epoch 2: weights differ from rank 0 on rank(s) 1" in said, said[-2000:]
    if on_mismatch == "repair":
        assert chief["mismatches"] == other["mismatches"] == 1  # repaired at epoch 2
        assert chief["fingerprint"] == other["fingerprint"]
        for rank in (0, 1):
            assert "repaired from rank 0" in rank_output(output, rank)
    else:
        assert chief["mismatches"] == other["mismatches"] == 2  # still apart at epoch 3
        assert chief["fingerprint"] != other["fingerprint"]


def test_tensorboard_batch_scalars_are_the_mean_of_every_ranks_batch_values(tmp_path):
    from forge_dist.keras.tb_events import scalar_values

    reports, _ = run_case(tmp_path, "tb-batch")
    mine = [r["batch_losses"] for r in reports]
    assert len(mine[0]) == len(mine[1]) == 24  # 3 epochs of 8 batches
    assert mine[0] != mine[1], "the ranks train on different data"
    logged = scalar_values(str(tmp_path / "root" / "tb" / "train"))["batch_loss"]
    assert [step for step, _ in logged] == list(range(1, 25))  # the optimizer's iterations
    assert [v for _, v in logged] == [
        pytest.approx((a + b) / 2, rel=1e-6) for a, b in zip(*mine, strict=True)
    ]
    pids = {f.split(".")[5] for _, _, fs in os.walk(tmp_path / "root" / "tb") for f in fs}
    assert pids == {str(reports[0]["pid"])}, "only the chief writes event files"
