"""Across hosts: ranks on separate test hosts (scripts/test-cluster.sh), each with its own
network namespace, hostname and node-local ``/scratch``; the checkpoint root on the shared
folder or on the chief's ``/scratch``.

Each rank validates on its own shard and the odd ranks' shards disagree (tests/_mpi_train.py),
so only the synced decisions keep the ranks together.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import SCRIPT, Cluster, cluster_env, gone, script
from multiproc import (
    HERE,
    Background,
    assert_ranks_consistent,
    has_committed_step,
    mpi_env,
    read_rank_reports,
    wait_until,
)

from forge_dist.storage import CheckpointStore

pytestmark = [pytest.mark.hosts, pytest.mark.mpi]
TRAIN = os.path.join(HERE, "_mpi_train.py")
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")
COMMON = ["--patience", "2", "--epochs", "8"]
QUICK = {"FORGE_DIST_TIMEOUT": "60"}
MWMS_ARGS = ["--epochs", "5", "--patience", "2"]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster.start("fdt", "10.77.9", 4)
    yield c
    done = c.stop()
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """One job of COMMON on two hosts under mpirun, never interrupted, its root on the
    shared folder: ``(root, reports)``. The resume tests end where it ends (the weights do
    not depend on where the root is), and the first agreement test checks it; run once,
    it spares two identical jobs."""
    root = cluster.shared / "run-mpirun-2"
    out = tmp_path_factory.mktemp("uninterrupted")
    return root, train(cluster, cluster.hosts[:2], str(root), out, *COMMON)[1]


def train(
    cluster: Cluster,
    hosts: list[str],
    root: str,
    out: Path,
    *extra,
    env=None,
    ok=True,
    launcher="mpirun",
):
    launch = cluster.mpirun if launcher == "mpirun" else cluster.horovodrun
    backend = ["--backend", "auto"] if launcher == "horovodrun" else []
    run = launch(
        hosts,
        [TRAIN, "--root", root, "--out", str(out), *backend, *extra],
        {**QUICK, **(env or {})},
    )
    if ok:
        assert run.returncode == 0, run.output[-4000:]
    return run, read_rank_reports(os.path.join(out, "rank-{rank}.json"), len(hosts), not ok)


def assert_only_the_chief_wrote(cluster: Cluster, hosts: list[str], reports: list[dict]) -> None:
    assert [r["host"] for r in reports] == hosts, "one rank on each host, in order"
    for host in hosts[1:]:
        assert cluster.files_on(host) == [], f"{host} is not the chief but wrote to /scratch"
    for r in reports[1:]:
        assert r["touched"] == [], (r["rank"], r["touched"][:5])


# horovodrun's hosts and slots at 4 hosts (2 hosts under it is the same path); mpirun at
# 4 hosts runs in test_e2e_hosts_slurm.py, inside a 4-node allocation.
@pytest.mark.parametrize("n, launcher", [(2, "mpirun"), (4, "horovodrun")])
def test_ranks_on_separate_hosts_agree_with_the_root_on_the_shared_folder(
    cluster, tmp_path, n, launcher, request
):
    hosts = cluster.hosts[:n]
    if (n, launcher) == (2, "mpirun"):
        root, reports = request.getfixturevalue("uninterrupted")
    else:
        root = cluster.shared / f"run-{launcher}-{n}"
        _, reports = train(cluster, hosts, str(root), tmp_path / "out", *COMMON, launcher=launcher)
    want = "horovod" if launcher == "horovodrun" else "mpi"
    assert [r["backend"] for r in reports] == [want] * n
    assert_only_the_chief_wrote(cluster, hosts, reports)
    for r in reports[1:]:
        assert_ranks_consistent(reports[0], r, str(root), epochs=8)
    assert {c.manifest.writer["host"] for c in CheckpointStore(str(root)).list()} == {hosts[0]}


def test_a_root_on_the_chiefs_node_local_disk_resumes_exactly(cluster, tmp_path, uninterrupted):
    """The chief reads the step from its own /scratch and broadcasts it: the other host
    never has the folder at all."""
    hosts = cluster.hosts[:2]
    _, whole = uninterrupted
    killed, _ = train(
        cluster,
        hosts,
        "/scratch/split",
        tmp_path / "b",
        *COMMON,
        "--kill-rank0-after-epoch",
        "0",
        ok=False,
    )
    assert killed.returncode != 0
    split = cluster.scratch(hosts[0]) / "split"
    assert CheckpointStore(str(split)).steps() == [8]
    _, resumed = train(cluster, hosts, "/scratch/split", tmp_path / "c", *COMMON, "--resume")
    assert_only_the_chief_wrote(cluster, hosts, resumed)
    b0, b1 = resumed
    assert b0["resumed_from_step"] == b1["resumed_from_step"] == 8
    assert any("step-00000008" in t for t in b0["touched"]), "the chief read the step"
    assert b0["fingerprints"] == b1["fingerprints"] == whole[0]["fingerprints"][1:]
    assert b0["final_fingerprint"] == b1["final_fingerprint"] == whole[0]["final_fingerprint"]
    assert b0["stopped_epoch"] == whole[0]["stopped_epoch"] > 0
    verify = cluster.run(hosts[0], [FORGE, "verify", "/scratch/split", "--all"])
    assert verify.returncode == 0, verify.output


def test_the_cluster_comes_up_isolated_and_goes_down_leaving_nothing(tmp_path):
    """Its own two-host cluster, beside the module's: what `up` and `slurm` make, and that
    `down` removes every namespace, link, process (daemons included), mount and file it
    made."""
    c = Cluster.start("fdz", "10.77.8", 2)
    try:
        a, b = c.hosts
        status = script(c.env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        # Each host: its own name, its own /scratch; the shared folder is the same.
        said = c.run(a, ["sh", "-c", "hostname; echo a > /scratch/mine"])
        assert said.returncode == 0 and said.output.split() == [a], said.output
        assert c.run(b, ["hostname"]).output.split() == [b]
        assert c.files_on(a) == ["mine"] and c.files_on(b) == []
        probe = (
            "import socket, sys, urllib.request;"
            "print(socket.gethostbyname(sys.argv[1]));"
            "print(urllib.request.urlopen(sys.argv[2], timeout=10).status)"
        )
        seen = c.run(b, [sys.executable, "-c", probe, a, c.s3])
        assert seen.output.split() == [c.addrs[0], "200"], seen.output
        (c.shared / "from-outside").write_text("x")
        listed = c.run(a, ["ls", str(c.shared)])
        assert listed.output.split() == ["from-outside"], listed.output
        # Each host runs an sshd that takes the cluster's key (horovodrun logs in so).
        if c.ssh:
            login = c.run(a, ["ssh", b, "hostname"])
            assert login.returncode == 0 and login.output.split() == [b], login.output
        # SLURM across the hosts: srun starts a task on each node, in that node.
        slurm = c.slurm()
        tasks = Background(
            ["srun", "-N", "2", "-n", "2", "sh", "-c", "echo $SLURM_PROCID $(hostname)"], slurm
        ).wait(120)
        assert tasks.returncode == 0, tasks.output
        assert sorted(tasks.output.strip().splitlines()) == [f"0 {a}", f"1 {b}"]
        # `up` and `slurm` again are no-ops: the same holders and daemons.
        pids = [c.pid(h) for h in c.hosts] + c.sshd_pids() + c.slurm_daemons()
        again = script(c.env, "up", "2")
        assert again.returncode == 0, again.stderr
        assert c.slurm() == slurm
        assert [c.pid(h) for h in c.hosts] + c.sshd_pids() + c.slurm_daemons() == pids
        # A host whose link is cut cannot reach the others; healed, it can again.
        c.link(b, up=False)
        cut = c.run(b, [sys.executable, "-c", probe, a, c.s3], bound_s=60)
        assert cut.returncode != 0
        c.link(b, up=True)
        assert c.run(b, [sys.executable, "-c", probe, a, c.s3]).returncode == 0
        wrong = script(c.env, "up", "3")
        assert wrong.returncode == 2 and "down" in wrong.stderr
    finally:
        done = c.stop()
    assert done.returncode == 0, done.stderr
    names = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "fdz-" not in names
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "fdz-" not in spaces
    assert all(gone(p) for p in pids)
    assert not os.path.exists("/tmp/forge-cluster-fdz")


def test_the_cluster_refuses_clearly_without_root():
    # A copy that user "nobody" can read: the checkout may sit in a folder only root can enter.
    import shutil
    import tempfile

    fd, copy = tempfile.mkstemp(prefix="test-cluster-", suffix=".sh", dir="/tmp")
    os.close(fd)
    try:
        shutil.copyfile(SCRIPT, copy)
        os.chmod(copy, 0o755)
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", copy, "up", "2"],
            capture_output=True,
            text=True,
            env=cluster_env("fdy", "10.77.7"),
            timeout=60,
            cwd="/",
        )
    finally:
        os.unlink(copy)
    assert done.returncode == 3, done.stderr
    assert "needs root" in done.stderr


def test_a_host_cut_off_mid_epoch_ends_every_rank_naming_it_and_resume_is_exact(cluster, tmp_path):
    """The third host's link goes down after the first committed step: the ranks on the
    other hosts end within the deadline, each naming rank 2 and its host; nothing partial
    is committed; healed and resumed, the job ends where an uninterrupted one ends."""
    hosts = cluster.hosts[:3]
    args = ["--epochs", "3", "--patience", "100", "--samples", "2048"]
    cut_env = {"FORGE_DIST_TIMEOUT": "20"}
    _, whole = train(cluster, hosts, str(cluster.shared / "whole"), tmp_path / "a", *args)
    root = cluster.shared / "cut"
    cmd, env = cluster.mpirun_cmd(
        hosts, [TRAIN, "--root", str(root), "--out", str(tmp_path / "b"), *args], cut_env
    )
    job = Background(cmd, env)
    out = tmp_path / "b"
    try:
        wait_until(lambda: has_committed_step(root), 240, "a committed step", job)
        cluster.link(hosts[2], up=False)
        cut_at = time.time()
        # The ranks end on their own; mpirun (PRRTE) waits on its daemon on the cut host
        # until the link is back, so it is waited for after the heal.
        said = lambda: all((out / f"rank-{r}.json").exists() for r in (0, 1))  # noqa: E731
        wait_until(said, 120, "the survivors' reports", job)
        reports = {r["rank"]: r for r in read_rank_reports(out / "rank-{rank}.json", 3, True)}
        wait_until(lambda: gone(reports[0]["pid"]) and gone(reports[1]["pid"]), 60, "their end")
        ended_at = time.time()
    finally:
        cluster.link(hosts[2], up=True)
    ended = job.wait(600)
    assert ended.returncode != 0
    for rank in (0, 1):
        error = reports[rank]["error"]
        assert f"rank(s) 2 did not answer (on host {hosts[2]})" in error, (error, ended.output)
        # Said within the deadline (20 s), the roll call (5 s) and the rest of the epoch
        # it was in, never by waiting out the launcher.
        assert reports[rank]["error_at"] - cut_at < 45, reports[rank]
    assert ended_at - cut_at < 60
    steps = CheckpointStore(str(root)).steps()
    assert steps, "the step committed before the cut is kept"
    verify = subprocess.run([FORGE, "verify", str(root), "--all"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    _, resumed = train(cluster, hosts, str(root), tmp_path / "c", *args, "--resume")
    assert {r["resumed_from_step"] for r in resumed} == {steps[-1]}
    assert {r["final_fingerprint"] for r in resumed} == {whole[0]["final_fingerprint"]}


def test_a_requeue_onto_other_hosts_refuses_to_start_over_from_a_node_local_root(cluster, tmp_path):
    """The first attempt wrote to /scratch on its chief's host; the requeued attempt
    (SLURM_RESTART_COUNT=1) lands on two other hosts, where /scratch/requeue is empty.
    Every rank fails naming the root, the chief's host and the node-local cause; allowed
    a fresh start, it trains from the beginning."""
    first, again = cluster.hosts[:2], cluster.hosts[2:4]
    train(cluster, first, "/scratch/requeue", tmp_path / "a", *COMMON)
    assert CheckpointStore(str(cluster.scratch(first[0]) / "requeue")).steps()
    requeued = {"SLURM_RESTART_COUNT": "1"}
    run, reports = train(
        cluster,
        again,
        "/scratch/requeue",
        tmp_path / "b",
        *COMMON,
        "--resume",
        env=requeued,
        ok=False,
    )
    assert run.returncode != 0
    assert [r["rank"] for r in reports] == [0, 1], run.output[-3000:]
    for r in reports:
        assert "ConfigurationError" in r["error"] and "SLURM_RESTART_COUNT=1" in r["error"]
        assert f"/scratch/requeue does not exist on {again[0]} (the chief)" in r["error"]
        assert "on tmpfs (mounted at /scratch), local to this node" in r["error"], r["error"]
    assert cluster.files_on(again[0]) == [] and cluster.files_on(again[1]) == []
    allowed = {**requeued, "FORGE_DIST_ALLOW_FRESH_START": "1"}
    _, fresh = train(
        cluster, again, "/scratch/requeue", tmp_path / "c", *COMMON, "--resume", env=allowed
    )
    assert {r.get("resumed_from_step") for r in fresh} == {None}
    assert CheckpointStore(str(cluster.scratch(again[0]) / "requeue")).steps()


def test_two_tiers_a_requeue_onto_other_hosts_resumes_from_the_durable_tier(
    cluster, tmp_path, uninterrupted
):
    """Two tiers: the chief commits to its host's /scratch and copies each step to the
    shared folder in the background. The chief is SIGKILLed as epoch 2 begins; the requeued
    attempt lands on two other hosts, whose /scratch is empty, and resumes from the newest
    durable step: on the shared folder, read from there, the same weights as a run never
    interrupted. Only the chiefs' hosts ever hold a local tier."""
    first, again = cluster.hosts[:2], cluster.hosts[2:4]
    _, whole = uninterrupted
    durable, local = cluster.shared / "tiers", "/scratch/tiers"
    tiers = ["--local-dir", local]
    killed, _ = train(
        cluster,
        first,
        str(durable),
        tmp_path / "b",
        *COMMON,
        *tiers,
        "--kill-rank1-at-epoch",
        "2",
        "--kill-rank",
        "0",
        ok=False,
    )
    assert killed.returncode != 0
    assert CheckpointStore(str(cluster.scratch(first[0]) / "tiers")).steps() == [8, 16]
    made_durable = CheckpointStore(str(durable)).steps()
    assert made_durable and set(made_durable) <= {8, 16}, made_durable
    assert cluster.files_on(first[1]) == []
    requeued = {"SLURM_RESTART_COUNT": "1"}
    _, resumed = train(
        cluster, again, str(durable), tmp_path / "c", *COMMON, *tiers, "--resume", env=requeued
    )
    step = max(made_durable)
    for r in resumed:
        assert r["resumed_from_step"] == step
        assert r["restored_from"] == str(durable), "read from the durable tier"
        assert r["fingerprints"] == whole[0]["fingerprints"][step // 8 :]
        assert r["final_fingerprint"] == whole[0]["final_fingerprint"]
    assert CheckpointStore(str(cluster.scratch(again[0]) / "tiers")).steps(), "a new local tier"
    assert cluster.files_on(again[1]) == []
    after = CheckpointStore(str(durable)).list()
    assert max(c.step for c in after) > step
    assert {c.manifest.writer["host"] for c in after if c.step > step} == {again[0]}
    verify = subprocess.run(
        [FORGE, "verify", str(durable), "--all"], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


LAUNCH_MWMS = os.path.join(os.path.dirname(HERE), "scripts", "launch_mwms.sh")


def mwms(cluster: Cluster, hosts: list[str], root: str, report: str, *extra: str) -> list[dict]:
    """scripts/launch_mwms.sh with one TF_CONFIG worker per host, started by the agent."""
    pytest.importorskip("tf_keras", reason="tf_keras is in the [tf] extra")
    env = {
        "FORGE_HOSTS": " ".join(hosts),
        "FORGE_AGENT": cluster.agent,
        "PYTHON_OVERRIDE": sys.executable,
        "FORGE_DIST_TIMEOUT": "120",
    }
    cmd = [LAUNCH_MWMS, "--checkpoint-dir", root, "--report", report, *extra]
    run = Background(cmd, mpi_env(env)).wait(300)
    assert run.returncode == 0, run.output[-4000:]
    return read_rank_reports(report, len(hosts))


def test_multi_worker_mirrored_strategy_across_hosts_has_one_writer_and_resumes(cluster, tmp_path):
    """Two TF_CONFIG workers on two hosts, addressed by host name; the root in the shared
    folder. Same weights and decisions, only the chief's host writes, and a resume ends
    where the uninterrupted run ends."""
    hosts = cluster.hosts[:2]
    whole = cluster.shared / "mwms-whole"
    w0, w1 = mwms(cluster, hosts, str(whole), str(tmp_path / "w-{rank}.json"), *MWMS_ARGS)
    assert [w0["host"], w1["host"]] == hosts and w0["backend"] == "tf" and w0["size"] == 2
    assert w0["fingerprint"] == w1["fingerprint"]
    assert w0["stopped_epoch"] == w1["stopped_epoch"] and w0["best_epoch"] == w1["best_epoch"]
    assert w1["touched_root"] == 0 and w0["touched_root"] > 0
    assert cluster.files_on(hosts[1]) == []
    assert {c.manifest.writer["host"] for c in CheckpointStore(str(whole)).list()} == {hosts[0]}
    split = cluster.shared / "mwms-split"
    mwms(cluster, hosts, str(split), str(tmp_path / "a-{rank}.json"), "--epochs", "2")
    r0, r1 = mwms(
        cluster, hosts, str(split), str(tmp_path / "b-{rank}.json"), *MWMS_ARGS, "--resume"
    )
    assert r0["resumed_step"] == r1["resumed_step"] is not None
    assert r0["fingerprint"] == r1["fingerprint"] == w0["fingerprint"]


def test_a_host_killed_during_a_save_leaves_no_partial_step_and_resume_is_exact(cluster, tmp_path):
    """Every process on the chief's host SIGKILLed while it is inside a save (a file of
    the step written, no manifest yet), as when a node dies: the other host's rank ends,
    no partial step is visible, and the job resumes from the previous step exactly."""
    hosts = cluster.hosts[:2]
    args = ["--epochs", "4", "--patience", "100"]
    _, whole = train(cluster, hosts, str(cluster.shared / "kill-whole"), tmp_path / "a", *args)
    root, out = cluster.shared / "kill", tmp_path / "b"
    cmd, env = cluster.mpirun_cmd(
        hosts,
        [TRAIN, "--root", str(root), "--out", str(out), *args, "--hold-save-at-epoch", "2"],
        QUICK,
    )
    job = Background(cmd, env)
    wait_until(lambda: (out / "holding").exists(), 240, "the chief inside its save", job)
    committed = CheckpointStore(str(root)).steps()
    assert committed == [8, 16]
    assert cluster.kill_host(hosts[0])
    job.wait(60)
    wait_until(lambda: cluster.processes_on(hosts[1]) == [], 60, "the end of the other rank")
    store = CheckpointStore(str(root))
    assert store.steps() == committed, "no partial step is visible"
    assert any(".tmp-" in p.name for p in root.iterdir()), "the torn save's staging is left"
    verify = subprocess.run([FORGE, "verify", str(root), "--all"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    _, resumed = train(cluster, hosts, str(root), tmp_path / "c", *args, "--resume")
    assert {r["resumed_from_step"] for r in resumed} == {16}
    assert {r["final_fingerprint"] for r in resumed} == {whole[0]["final_fingerprint"]}


@pytest.mark.parametrize("where", ["shared", "s3"])
def test_a_cut_off_chief_that_goes_on_is_fenced_by_the_requeued_attempt(cluster, tmp_path, where):
    """Attempt A's chief is inside a save when its host is cut off; attempt B (a requeue
    on two other hosts) resumes from the same root, takes the writer lease and commits.
    A's chief then goes on (still cut off, on the shared folder; after the heal, on S3,
    which it cannot reach before) and must commit and delete nothing."""
    hosts = cluster.hosts
    args = ["--epochs", "4", "--patience", "100"]
    env = dict(QUICK)
    if where == "shared":
        root = str(cluster.shared / "fence")
        options = None
    else:
        import boto3

        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        env.update(creds, AWS_ENDPOINT_URL=cluster.s3, AWS_DEFAULT_REGION="us-east-1")
        options = {"key": "testing", "secret": "testing"}
        options["client_kwargs"] = {"endpoint_url": cluster.s3, "region_name": "us-east-1"}
        boto3.client(
            "s3",
            endpoint_url=cluster.s3,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="fence")
        root = "s3://fence/run"
    out_a = tmp_path / "a"
    cmd, menv = cluster.mpirun_cmd(
        hosts[:2],
        [TRAIN, "--root", root, "--out", str(out_a), *args, "--hold-save-at-epoch", "2"],
        {**env, "FORGE_DIST_TIMEOUT": "300"},
    )
    a = Background(cmd, menv)
    try:
        wait_until(lambda: (out_a / "holding").exists(), 240, "A's chief inside its save", a)
        chief = json.loads((out_a / "holding").read_text())["pid"]
        cluster.link(hosts[0], up=False)
        _, b = train(cluster, hosts[2:], root, tmp_path / "b", *args, "--resume", env=env)
        assert {r["resumed_from_step"] for r in b} == {16}
        store = CheckpointStore(root, options)
        before = {(c.step, c.manifest.writer["host"]) for c in store.list()}
        assert before and {h for _, h in before} <= {hosts[0], hosts[2]}
        if where == "s3":
            cluster.link(hosts[0], up=True)
        os.kill(chief, signal.SIGUSR2)  # A's chief goes on with its save
        wait_until(lambda: "error" in read_report(out_a / "rank-0.json"), 120, "A's verdict")
    finally:
        cluster.link(hosts[0], up=True)
    a.wait(600)
    said = read_report(out_a / "rank-0.json")["error"]
    assert "StaleWriterError" in said, said
    after = {(c.step, c.manifest.writer["host"]) for c in store.list()}
    assert after == before, "the fenced chief committed or deleted a step"
    for step in store.steps():
        assert store.verify(step).ok


def read_report(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
