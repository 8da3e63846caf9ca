"""Real ``sbatch`` on a live one-node SLURM cluster (slurm/local-cluster.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from multiproc import run_bounded

from forge_dist.storage import CheckpointStore

pytestmark = pytest.mark.slurm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "slurm", "local-cluster.sh")
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")


@pytest.fixture(scope="module")
def slurm_env():
    """Bring the cluster up for these tests and take it down after."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM test cluster runs its daemons as root; not root here")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("slurm-wlm is not installed and there is no apt-get to install it")
    up = subprocess.run([CLUSTER, "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    conf = subprocess.run([CLUSTER, "env"], capture_output=True, text=True, timeout=30)
    env = dict(os.environ, SLURM_CONF=conf.stdout.strip().split("=", 1)[1])
    yield env
    subprocess.run([CLUSTER, "down"], capture_output=True, timeout=60)


def test_srun_runs_two_tasks(slurm_env):
    out = subprocess.run(
        ["srun", "-n", "2", "sh", "-c", "echo task $SLURM_PROCID"],
        capture_output=True,
        text=True,
        timeout=120,
        env=slurm_env,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split("\n")[:2]) == ["task 0", "task 1"]


def test_sbatch_mpi_job_trains_consistently(slurm_env, tmp_path):
    root = tmp_path / "root"
    report = str(tmp_path / "rank-{rank}.json")
    env = dict(
        slurm_env,
        FORGE_CHECKPOINT_DIR=str(root),
        FORGE_EPOCHS="20",
        FORGE_PYTHON=sys.executable,
        FORGE_TRAIN_ARGS=f"--patience 2 --report {report}",
    )
    run = run_bounded(
        [
            "sbatch",
            "--wait",
            f"--output={tmp_path}/job-%j.out",
            os.path.join(ROOT, "slurm", "train_mpi.sbatch"),
        ],
        env,
        bound_s=300,
    )
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert run.returncode == 0, run.output + logs[-3000:]
    assert "2 ranks on" in logs
    reports = []
    for r in (0, 1):  # both tasks ran
        with open(report.replace("{rank}", str(r))) as f:
            reports.append(json.load(f))
    r0, r1 = reports
    assert r0["backend"] == "mpi" and r0["size"] == 2
    assert r0["stopped_epoch"] == r1["stopped_epoch"] > 0
    assert r0["fingerprint"] == r1["fingerprint"]
    assert r1["touched_root"] == 0 and r0["touched_root"] > 0
    assert {c.manifest.writer["rank"] for c in CheckpointStore(str(root)).list()} == {0}
    assert subprocess.run([FORGE, "verify", str(root), "--all"], timeout=60).returncode == 0
