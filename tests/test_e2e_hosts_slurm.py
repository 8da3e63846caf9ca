"""``sbatch -N 2`` across test hosts: SLURM with a slurmd on every host of the test
cluster (scripts/test-cluster.sh slurm), the repository's own slurm/*.sbatch jobs, the
checkpoint root on the shared folder or on a node's /scratch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from cluster import Cluster
from multiproc import read_rank_reports, run_bounded, sbatch_env, sbatch_wait

from forge_dist.storage import CheckpointStore

pytestmark = [pytest.mark.hosts, pytest.mark.slurm]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster.start("fds", "10.77.10", 4)
    c.slurm_env = c.slurm()  # SLURM_CONF for the client commands run here
    yield c
    done = c.stop()
    assert done.returncode == 0, done.stderr


def job_env(cluster: Cluster, root: str, epochs: int, train_args: str) -> dict[str, str]:
    return sbatch_env(cluster.slurm_env, root, epochs, train_args)


def job_state(cluster: Cluster, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job],
        capture_output=True,
        text=True,
        env=cluster.slurm_env,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def scontrol(cluster: Cluster, *args: str) -> None:
    done = subprocess.run(
        ["scontrol", *args], capture_output=True, text=True, env=cluster.slurm_env, timeout=30
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "script, backend, n",
    # Each job script once; 2 and 4 nodes between them (a 4-node job costs no more).
    [("train_mpi", "mpi", 4), ("train_horovod", "horovod", 2), ("train_mwms", "tf", 4)],
)
def test_an_sbatch_job_on_n_nodes_runs_a_rank_on_each_and_they_agree(
    cluster, tmp_path, script, backend, n
):
    """One task on each of n nodes: each rank runs on its own node (mpirun inside the
    allocation follows SLURM's placement; srun starts one worker per node), validates on
    its own shard, and they stop in the same epoch with the same weights; only the chief
    writes, and every step verifies."""
    if backend == "horovod":
        pytest.importorskip("horovod.tensorflow", reason="Horovod is built by make setup")
    if backend == "tf":
        pytest.importorskip("tf_keras", reason="tf_keras is in the [tf] extra")
    nodes = cluster.hosts[:n]
    root = str(cluster.shared / f"sbatch-{script}-{n}")
    report = str(tmp_path / "rank-{rank}.json")
    env = job_env(cluster, root, 20, f"--patience 2 --report {report}")
    placed = ["-N", str(n), "-n", str(n), "-w", ",".join(nodes)]
    run, logs = sbatch_wait(script, placed, env, str(tmp_path))
    assert run.returncode == 0, run.output + logs[-3000:]
    assert f"{n} tasks on {cluster.name}-h[1-{n}]" in logs
    reports = read_rank_reports(report, n)
    assert [r["host"] for r in reports] == nodes, "one rank on each node, the chief first"
    assert {(r["backend"], r["size"]) for r in reports} == {(backend, n)}
    assert len({r["stopped_epoch"] for r in reports}) == 1, "the same stop epoch"
    assert reports[0]["stopped_epoch"] > 0, "it stopped early"
    assert len({r["fingerprint"] for r in reports}) == 1, "the same weights"
    assert reports[0]["touched_root"] > 0, "the chief wrote"
    assert [r["touched_root"] for r in reports[1:]] == [0] * (n - 1), "only the chief wrote"
    steps = CheckpointStore(root).list()
    assert steps and {(c.manifest.writer["rank"], c.manifest.writer["host"]) for c in steps} == {
        (0, nodes[0])
    }
    for node in nodes[1:]:
        assert cluster.files_on(node) == [], f"{node} wrote to its /scratch"
    assert subprocess.run([FORGE, "verify", root, "--all"], timeout=60).returncode == 0


def test_a_job_requeued_onto_other_nodes_refuses_to_start_over_from_a_node_local_root(
    cluster, tmp_path
):
    """The first run of the job writes its checkpoints to /scratch on its chief's node.
    SLURM requeues it (scontrol requeue: Restarts=1, SLURM_RESTART_COUNT=1 in the job) and
    it starts on two other nodes, whose /scratch has nothing: the job fails at once with
    one line naming the root, the chief's node and the node-local cause, and ends FAILED
    instead of training from scratch."""
    first, again = cluster.hosts[:2], cluster.hosts[2:4]
    root = "/scratch/requeued"
    out = tmp_path / "job.out"
    env = job_env(cluster, root, 2, "")
    submit = [
        "sbatch",
        "--parsable",
        "-N",
        "2",
        "-w",
        ",".join(first),
        "--wait",
        f"--output={out}",
        os.path.join(ROOT, "slurm", "train_mpi.sbatch"),
    ]
    run = run_bounded(submit, env, bound_s=300)
    assert run.returncode == 0, run.output + out.read_text()[-3000:]
    job = run.output.strip().splitlines()[0].split(";")[0]
    assert CheckpointStore(str(cluster.scratch(first[0]) / "requeued")).steps()
    scontrol(cluster, "requeue", job)
    scontrol(cluster, "update", f"JobId={job}", f"ReqNodeList={','.join(again)}")
    deadline = time.monotonic() + 180
    while (state := job_state(cluster, job))["JobState"] not in ("COMPLETED", "FAILED"):
        assert time.monotonic() < deadline, f"the requeued job did not end: {state}"
        time.sleep(1)
    logs = out.read_text()
    second = logs[logs.index("(restart 1)") :]
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", logs[-3000:]
    assert f"2 tasks on {cluster.name}-h[3-4]" in second
    said = "train.py: ConfigurationError: this job was restarted (SLURM_RESTART_COUNT=1)"
    assert said in second, second[-3000:]
    assert f"{root} does not exist on {again[0]} (the chief)" in second
    assert "on tmpfs (mounted at /scratch), local to this node" in second
    # Rank 1 learns it from the chief's broadcast; mpirun may end it before it says so.
    for line in second.splitlines():
        if line.startswith("train.py: ") and "ConfigurationError: this job" not in line:
            assert "given up on rank 1: rank 0 failed before reaching it" in line, line
    assert "Traceback" not in second, "one line per rank, no traceback"
    assert cluster.files_on(again[0]) == [] and cluster.files_on(again[1]) == []
