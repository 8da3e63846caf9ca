"""The same scenario as test_e2e_mpirun.py under Horovod: ``horovodrun --gloo`` (Keras 3 with
forge_dist's optimizer, tf_keras with Horovod's own) and ``mpirun`` with Horovod's MPI
controller."""

from __future__ import annotations

import os

import pytest
from multiproc import (
    HERE,
    assert_ranks_consistent,
    finished_normally,
    horovodrun,
    mpirun,
    read_rank_reports,
)

pytestmark = pytest.mark.horovod
TRAIN = os.path.join(HERE, "_mpi_train.py")
COMMON = ["--patience", "2", "--epochs", "8", "--backend", "auto"]


def results(out_dir) -> list[dict]:
    return read_rank_reports(os.path.join(out_dir, "rank-{rank}.json"))


@pytest.mark.parametrize(
    "flavor, extra",
    [("keras3", []), ("tf_keras", ["--hvd-optimizer"])],
    ids=["keras3-forge-optimizer", "tf_keras-horovod-optimizer"],
)
def test_horovodrun_gloo_keeps_ranks_consistent(tmp_path, flavor, extra):
    root, out = tmp_path / "root", tmp_path / "out"
    env = {"TF_USE_LEGACY_KERAS": "1"} if flavor == "tf_keras" else {}
    run = horovodrun(2, [TRAIN, "--root", str(root), "--out", str(out), *COMMON, *extra], env)
    assert run.returncode == 0, run.output[-4000:]
    r0, r1 = results(out)
    assert r0["backend"] == r1["backend"] == "horovod"
    assert r0["flavor"] == flavor
    assert_ranks_consistent(r0, r1, root, epochs=8)


def test_mpirun_with_horovods_mpi_controller(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    env = {"HOROVOD_CONTROLLER": "mpi", "HOROVOD_CPU_OPERATIONS": "mpi"}
    # Horovod is initialised by an explicit backend="horovod"; auto would pick mpi here.
    args = [
        TRAIN,
        "--root",
        str(root),
        "--out",
        str(out),
        "--patience",
        "2",
        "--epochs",
        "8",
        "--backend",
        "horovod",
    ]
    run = mpirun(2, args, env)
    assert run.returncode == 0, run.output[-4000:]
    r0, r1 = results(out)
    assert r0["backend"] == "horovod"
    assert_ranks_consistent(r0, r1, root, epochs=8)


def test_a_dead_rank_ends_the_job_with_a_clear_error(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    run = horovodrun(
        2,
        [TRAIN, "--root", str(root), "--out", str(out), *COMMON, "--kill-rank1-at-epoch", "1"],
        {"FORGE_DIST_TIMEOUT": "8"},
        bound_s=120,
    )
    assert run.returncode != 0
    # horovodrun ends the job at once and names the rank that died.
    assert "Process name: 1" in run.output and "Exit code: 137" in run.output
    assert finished_normally(out, 2) == [], "the survivor must not finish normally"


def test_a_hung_rank_becomes_an_error_on_the_survivor_within_the_deadline(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    deadline = 8
    run = horovodrun(
        2,
        [TRAIN, "--root", str(root), "--out", str(out), *COMMON, "--stop-rank1-at-epoch", "1"],
        {"FORGE_DIST_TIMEOUT": str(deadline)},
        bound_s=180,
    )
    assert run.returncode != 0
    survivor = "\n".join(ln for ln in run.output.splitlines() if ln.startswith("[0]"))
    # forge_dist's error, naming the deadline, even where Horovod's all-reduce inside the
    # compiled step is the collective that gave up.
    want = "forge_dist.errors.CollectiveTimeoutError: collective 'DistributedOptimizer(gradients)'"
    assert want in survivor, survivor[-3000:]
    assert f"hung past the deadline ({deadline}s, FORGE_DIST_TIMEOUT)" in survivor
    assert finished_normally(out, 2) == []


def test_launch_script_trains_and_resumes_like_an_uninterrupted_run(tmp_path):
    import subprocess

    from multiproc import horovodrun_path, mpi_env, run_bounded

    horovodrun_path()  # skips with a reason where Horovod is not built
    launch = os.path.join(os.path.dirname(HERE), "scripts", "launch_horovod.sh")
    env = mpi_env({"PYTHON_OVERRIDE": os.sys.executable})

    def run(root, *extra):
        report = str(tmp_path / (os.path.basename(root) + "-{rank}.json"))
        r = run_bounded(
            [launch, "--checkpoint-dir", str(root), "--report", report, *extra], env, bound_s=240
        )
        assert r.returncode == 0, r.output[-3000:]
        return read_rank_reports(report)

    whole = run(tmp_path / "whole", "--epochs", "20", "--patience", "2")
    run(tmp_path / "split", "--epochs", "3", "--patience", "2")
    resumed = run(tmp_path / "split", "--epochs", "20", "--patience", "2", "--resume")
    assert whole[0]["backend"] == "horovod"
    assert whole[0]["fingerprint"] == whole[1]["fingerprint"]
    assert whole[0]["stopped_epoch"] == whole[1]["stopped_epoch"] > 0
    assert resumed[0]["stopped_epoch"] == whole[0]["stopped_epoch"]
    assert whole[1]["touched_root"] == 0 and whole[0]["touched_root"] > 0
    assert resumed[0]["fingerprint"] == resumed[1]["fingerprint"] == whole[0]["fingerprint"]
    forge = os.path.join(os.path.dirname(os.sys.executable), "forge-dist")
    for root in ("whole", "split"):
        assert (
            subprocess.run([forge, "verify", str(tmp_path / root), "--all"], timeout=60).returncode
            == 0
        )
