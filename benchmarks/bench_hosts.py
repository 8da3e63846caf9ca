"""Across test hosts (scripts/test-cluster.sh), each against a baseline measured in the
same run.

    python benchmarks/bench_hosts.py [--rounds 3]

1. The per-epoch cost of SyncMetrics + SyncEarlyStopping (benchmarks/_keras_worker.py
   ``epoch mpi``) with one rank on each of 2 and 4 test hosts, against the same number
   of ranks under a plain ``mpirun`` in one namespace. Rounds alternate the two, medians
   per setting. The hosts' bridge is in memory: this is the protocol's cost of crossing
   namespaces (TCP over veth instead of shared memory), not a real network's.
2. Bytes each host wrote per save: ``scripts/train.py`` on 2 hosts with the checkpoint
   root on the chief's node-local ``/scratch``; what is under each host's ``/scratch``
   divided by the steps kept (non-chief hosts: 0).

Needs root (the cluster); elsewhere it says so and writes nothing. Writes
benchmarks/out/hosts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

from _out import write_result

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "scripts", "test-cluster.sh")
WORKER = os.path.join(HERE, "_keras_worker.py")
BIN = os.path.dirname(sys.executable)
MPIRUN = os.path.join(BIN, "mpirun")
REFUSED = 3


def env() -> dict[str, str]:
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        OMP_NUM_THREADS="1",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        FORGE_CLUSTER_NAME="fdb",
        FORGE_CLUSTER_NET="10.77.6",
        FORGE_CLUSTER_PYTHON=sys.executable,
    )


def cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env(), timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=900)
    if out.returncode != 0:
        said = out.stdout[-1500:] + out.stderr[-3000:]
        raise SystemExit(f"{shlex.join(cmd[:8])} ... failed:\n{said}")
    return out.stdout


def on_hosts(agent: str, hosts: list[str], args: list[str]) -> list[str]:
    """``mpirun`` started on the first host, one rank per host, through the agent."""
    inner = [MPIRUN, "--host", ",".join(f"{h}:1" for h in hosts), "-np", str(len(hosts))]
    inner += ["--prtemca", "plm_ssh_agent", agent, sys.executable, *args]
    return [agent, hosts[0], shlex.join(inner)]


def scratch_bytes(state: str, host: str) -> tuple[int, int]:
    """(bytes in committed steps, steps) under ``host``'s /scratch."""
    with open(os.path.join(state, f"{host}.pid")) as f:
        top = f"/proc/{f.read().strip()}/root/scratch"
    total, steps = 0, set()
    for d, _, files in os.walk(top):
        rel = os.path.relpath(d, top).split(os.sep)
        step = next((p for p in rel if p.startswith("step-") and "." not in p), None)
        if step is None:
            continue
        steps.add(step)
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total, len(steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cluster("down")
    up = cluster("up", "4")
    if up.returncode == REFUSED:
        print(f"bench_hosts: skipped: {up.stderr.strip()}", file=sys.stderr)
        return 0
    if up.returncode != 0:
        raise SystemExit(f"bench_hosts: the test cluster did not start: {up.stderr}")
    try:
        lines = cluster("env").stdout.splitlines()
        values = dict(ln.removeprefix("export ").split("=", 1) for ln in lines if ln)
        hosts = shlex.split(values["FORGE_CLUSTER_HOSTS"])[0].split()
        agent = shlex.split(values["FORGE_CLUSTER_AGENT"])[0]
        state = os.path.dirname(os.path.dirname(agent))
        results: dict = {"rounds": args.rounds}

        runs: dict[str, dict[int, list[float]]] = {"hosts": {2: [], 4: []}, "local": {2: [], 4: []}}
        for _ in range(args.rounds):
            for n in (2, 4):
                local = [MPIRUN, "-np", str(n), "--oversubscribe", sys.executable, WORKER]
                runs["local"][n].append(last_json(run([*local, "epoch", "mpi"]))["forge_ms"])
                cmd = on_hosts(agent, hosts[:n], [WORKER, "epoch", "mpi"])
                runs["hosts"][n].append(last_json(run(cmd))["forge_ms"])
        epoch = {
            n: {
                "hosts_ms": statistics.median(runs["hosts"][n]),
                "local_ms": statistics.median(runs["local"][n]),
            }
            for n in (2, 4)
        }
        for n, e in epoch.items():
            e["ratio"] = e["hosts_ms"] / e["local_ms"]
            print(
                f"1. SyncMetrics+SyncEarlyStopping per epoch, {n} ranks: on {n} hosts "
                f"{e['hosts_ms']:.2f} ms vs one namespace {e['local_ms']:.2f} ms "
                f"= {e['ratio']:.2f}x"
            )
        results["epoch_sync"] = {"by_ranks": epoch, "runs": runs}

        train = [
            os.path.join(ROOT, "scripts", "train.py"),
            "--backend",
            "mpi",
            "--checkpoint-dir",
            "/scratch/bench",
            "--epochs",
            "3",
            "--patience",
            "100",
        ]
        run(on_hosts(agent, hosts[:2], train))
        per_host = {}
        for h in hosts[:2]:
            total, steps = scratch_bytes(state, h)
            per_host[h] = total / steps if steps else 0.0
        chief, other = per_host[hosts[0]], per_host[hosts[1]]
        results["bytes_per_save"] = {"chief": chief, "other": other}
        print(f"2. bytes written per save: chief's host {chief:.0f}, the other host {other:.0f}")
    finally:
        down = cluster("down")
        if down.returncode != 0:
            print(f"bench_hosts: down failed: {down.stderr}", file=sys.stderr)
    write_result("hosts", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
