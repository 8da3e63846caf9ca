"""Real ``sbatch`` on a live one-node SLURM cluster (slurm/local-cluster.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from multiproc import read_rank_reports, sbatch_env, sbatch_wait

from forge_dist.storage import CheckpointStore

pytestmark = pytest.mark.slurm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "slurm", "local-cluster.sh")
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")
TRAIN = os.path.join(ROOT, "scripts", "train.py")


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


def job_state(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def job_env(slurm_env, root, epochs, train_args):
    return sbatch_env(slurm_env, str(root), epochs, train_args)


@pytest.mark.parametrize(
    "script, backend, keras_flavor",
    [
        ("train_mpi", "mpi", "keras3"),
        ("train_horovod", "horovod", "keras3"),
        ("train_mwms", "tf", "tf_keras"),
    ],
)
def test_sbatch_job_trains_consistently(slurm_env, tmp_path, script, backend, keras_flavor):
    if backend == "horovod":
        pytest.importorskip("horovod.tensorflow", reason="Horovod is built by make setup")
    root = tmp_path / "root"
    report = str(tmp_path / "rank-{rank}.json")
    env = job_env(slurm_env, root, 20, f"--patience 2 --report {report}")
    env["FORGE_DIST_PREEMPT_NOTICE_S"] = "0.001"  # (the scripts' own is 120 s)
    run, logs = sbatch_wait(script, [], env, str(tmp_path))
    assert run.returncode == 0, run.output + logs[-3000:]
    assert "2 tasks on" in logs
    r0, r1 = read_rank_reports(report)
    assert (r0["backend"], r0["size"], r0["keras"]) == (backend, 2, keras_flavor)
    assert r0["stopped_epoch"] == r1["stopped_epoch"] > 0, "same stop epoch, and it stopped"
    assert r0["fingerprint"] == r1["fingerprint"]
    assert r1["touched_root"] == 0 and r0["touched_root"] > 0, "exactly one writer"
    assert {c.manifest.writer["rank"] for c in CheckpointStore(str(root)).list()} == {0}
    assert subprocess.run([FORGE, "verify", str(root), "--all"], timeout=60).returncode == 0
    # The chief warned, in the job's output, that the notice cannot fit a save.
    warned = [ln for ln in logs.splitlines() if "notice of 0.001 s cannot fit" in ln]
    assert warned and all("(measured by epoch 1)" in ln for ln in warned), logs[-3000:]


@pytest.mark.parametrize("tiers", [False, True], ids=["one-root", "two-tiers"])
def test_scancel_usr1_saves_once_requeues_and_resumes_exactly(slurm_env, tmp_path, tiers):
    """A USR1 warning to the batch shell (as `#SBATCH --signal=B:USR1@120` sends it) of a
    running job: every rank saves and exits 75, the job requeues itself, the second run
    resumes mid-epoch and ends with the weights of an uninterrupted run. With
    FORGE_LOCAL_DIR (two tiers) the steps commit there and are copied to the root; the
    requeued job on the same node resumes from the local tier."""
    from multiproc import has_committed_step, mpirun, wait_until

    args = "--patience 100 --samples 1024"  # 32 batches an epoch, no early stop: 6 epochs
    ref = tmp_path / "ref"
    run = mpirun(
        2,
        [
            TRAIN,
            "--backend",
            "mpi",
            "--checkpoint-dir",
            str(ref),
            "--epochs",
            "6",
            *args.split(),
            "--report",
            str(tmp_path / "ref-{rank}.json"),
        ],
    )
    assert run.returncode == 0, run.output[-3000:]
    expected = read_rank_reports(str(tmp_path / "ref-{rank}.json"))[0]["fingerprint"]

    root = tmp_path / "root"
    report = str(tmp_path / "rank-{rank}.json")
    env = job_env(slurm_env, root, 6, f"{args} --report {report}")
    local = tmp_path / "node-local"
    if tiers:
        env["FORGE_LOCAL_DIR"] = str(local)
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={tmp_path}/job.out",
            os.path.join(ROOT, "slurm", "train_mpi.sbatch"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    try:
        wait_until(lambda: has_committed_step(root), 120, "first checkpoint")
        sig = subprocess.run(
            ["scancel", "--batch", "--signal=USR1", job], env=slurm_env, timeout=30
        )
        assert sig.returncode == 0
        # SLURM starts the requeued job once the old run's credential has expired
        # (cred_expire: 10 s on the test cluster, 120 s by default).
        wait_until(lambda: job_state(slurm_env, job).get("Restarts") == "1", 120, "requeue")
        wait_until(
            lambda: (
                job_state(slurm_env, job)["JobState"]
                in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
            ),
            240,
            "the end of the requeued job",
        )
    finally:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30)
    logs = (tmp_path / "job.out").read_text()
    state = job_state(slurm_env, job)
    assert state["JobState"] == "COMPLETED", logs[-3000:]
    assert "requeueing" in logs and "restart 1" in logs
    saved = re.findall(r"preempted by SIGUSR1: saved step (\d+) \(epoch \d+", logs)
    assert len(saved) == 1, logs[-3000:]  # one save, announced by the chief
    r0, r1 = read_rank_reports(report)
    assert r0["resumed_step"] == r1["resumed_step"] == int(saved[0])
    assert r0["fingerprint"] == r1["fingerprint"] == expected
    assert subprocess.run([FORGE, "verify", str(root), "--all"], timeout=60).returncode == 0
    assert ("(the local tier)" in r0["resumed_from"]) is tiers, r0["resumed_from"]
    if tiers:
        assert subprocess.run([FORGE, "verify", str(local), "--all"], timeout=60).returncode == 0
        durable = {c.step: c.manifest.files for c in CheckpointStore(str(root)).list()}
        here = {c.step: c.manifest.files for c in CheckpointStore(str(local)).list()}
        assert max(durable) == max(here), "the last step was made durable at train end"
        assert all(durable[s] == here[s] for s in set(durable) & set(here)), "same bytes"


def test_down_stops_only_the_daemons_it_started(tmp_path):
    """A site's own slurmd/slurmctld (here: processes of those names that this script did
    not start) survive ``local-cluster.sh down``."""
    decoys = []
    try:
        for name in ("slurmd", "slurmctld"):
            exe = tmp_path / name
            shutil.copy(shutil.which("sleep"), exe)
            decoys.append(subprocess.Popen([str(exe), "300"]))
        env = dict(os.environ, FORGE_SLURM_DIR=str(tmp_path / "cluster"))
        down = subprocess.run(
            [CLUSTER, "down"], env=env, capture_output=True, text=True, timeout=60
        )
        assert down.returncode == 0, down.stderr
        assert "stopped 0 daemon(s) of its own" in down.stderr
        assert all(p.poll() is None for p in decoys), "another process was stopped"
    finally:
        for p in decoys:
            p.kill()
            p.wait()
