"""What the README promises "on every rank", in real processes under ``mpirun -np 2`` (the
thread tests of the same promises share Python objects between ranks): different metric
names, a failed CSV write, a failed background save on a full disk, ``when_busy="skip"``,
and the weight guard's warn and repair. Each rank reports its own outcome."""

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
