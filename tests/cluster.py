"""The multi-host test cluster (scripts/test-cluster.sh) seen from the tests: hosts that
are network, mount and UTS namespaces on this machine, each with its own ``/scratch``."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from multiproc import Background, Run, horovodrun_path, mpi_env, need_mpi

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "scripts", "test-cluster.sh")
REFUSED = 3  # test-cluster.sh: this machine cannot host the cluster


def gone(pid: int) -> bool:
    """Not running: no such process, or one that has exited (a zombie until this
    machine's init reaps the orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def cluster_env(name: str, net: str) -> dict[str, str]:
    return dict(
        os.environ,
        FORGE_CLUSTER_NAME=name,
        FORGE_CLUSTER_NET=net,
        FORGE_CLUSTER_PYTHON=sys.executable,
    )


def script(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@dataclass
class Cluster:
    name: str
    env: dict[str, str]
    hosts: list[str]
    addrs: list[str]
    agent: str
    shared: Path
    s3: str
    ssh: bool  # every host runs an sshd (horovodrun needs it)

    @classmethod
    def start(cls, name: str, net: str, n: int) -> Cluster:
        """``up n`` from a clean slate; skip (with the script's reason) where this machine
        cannot host it, fail on any other error."""
        env = cluster_env(name, net)
        script(env, "down")
        up = script(env, "up", str(n))
        if up.returncode == REFUSED:
            pytest.skip(up.stderr.strip())
        assert up.returncode == 0, up.stderr
        exports = script(env, "env")
        assert exports.returncode == 0, exports.stderr
        values = {}
        for line in exports.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = shlex.split(value)[0] if value else ""
        return cls(
            name=name,
            env=env,
            hosts=values["FORGE_CLUSTER_HOSTS"].split(),
            addrs=values["FORGE_CLUSTER_ADDRS"].split(),
            agent=values["FORGE_CLUSTER_AGENT"],
            shared=Path(values["FORGE_CLUSTER_SHARED"]),
            s3=values["FORGE_CLUSTER_S3"],
            ssh=values.get("FORGE_CLUSTER_SSH") == "1",
        )

    def stop(self) -> subprocess.CompletedProcess:
        return script(self.env, "down")

    def slurm(self) -> dict[str, str]:
        """Start SLURM across the hosts (``test-cluster.sh slurm``: slurmctld on the first
        host, a slurmd on each); the environment for sbatch, srun and scontrol."""
        done = script(self.env, "slurm", timeout=600)
        if done.returncode == REFUSED:
            pytest.skip(done.stderr.strip())
        assert done.returncode == 0, done.stderr
        exports = script(self.env, "env").stdout
        conf = next(
            line.partition("=")[2].strip("'")
            for line in exports.splitlines()
            if line.startswith("export FORGE_CLUSTER_SLURM_CONF=")
        )
        return dict(os.environ, SLURM_CONF=conf)

    def slurm_daemons(self) -> list[int]:
        """The pids of the cluster's munged, slurmctld and every host's slurmd."""
        state = Path(self.agent).parent.parent / "slurm"
        files = ["munged.pid", "slurmctld.pid", *(f"slurmd-{h}.pid" for h in self.hosts)]
        return [int((state / f).read_text()) for f in files]

    def pid(self, host: str) -> int:
        """The process that holds ``host``'s namespaces."""
        state = Path(self.agent).parent.parent
        return int((state / f"{host}.pid").read_text())

    def sshd_pids(self) -> list[int]:
        """Every host's sshd (none when the cluster runs none)."""
        state = Path(self.agent).parent.parent
        return [int((state / "ssh" / f"{h}.sshd.pid").read_text()) for h in self.hosts if self.ssh]

    def processes_on(self, host: str) -> list[int]:
        """What runs on ``host`` besides the cluster's own holder and sshd."""
        pids = subprocess.run(
            ["ip", "netns", "pids", host], capture_output=True, text=True, check=True
        ).stdout.split()
        own = {self.pid(host), *self.sshd_pids()}
        return [int(p) for p in pids if int(p) not in own and not gone(int(p))]

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL everything running on ``host`` (as when a node dies), the holder and
        sshd aside; the pids killed."""
        pids = self.processes_on(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def scratch(self, host: str) -> Path:
        """``host``'s node-local /scratch, seen from outside it."""
        return Path(f"/proc/{self.pid(host)}/root/scratch")

    def on(self, host: str, cmd: list[str]) -> list[str]:
        """``cmd`` run on ``host`` through the agent."""
        return [self.agent, host, shlex.join(cmd)]

    def run(self, host: str, cmd: list[str], bound_s: float = 60, env=None) -> Run:
        return Background(self.on(host, cmd), mpi_env(env)).wait(bound_s)

    def link(self, host: str, up: bool) -> None:
        done = script(self.env, "heal" if up else "cut", host)
        assert done.returncode == 0, done.stderr

    def mpirun_cmd(
        self, hosts: list[str], args: list[str], env_extra: dict[str, str] | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """``mpirun --host A:1,B:1,...`` started on the first host, one rank per host,
        the others launched through the agent as ssh would launch them."""
        mpirun = need_mpi()
        exported = [a for k in (env_extra or {}) for a in ("-x", k)]
        cmd = [
            mpirun,
            "--host",
            ",".join(f"{h}:1" for h in hosts),
            "-np",
            str(len(hosts)),
            "--prtemca",
            "plm_ssh_agent",
            self.agent,
            *exported,
            sys.executable,
            *args,
        ]
        return self.on(hosts[0], cmd), mpi_env(env_extra)

    def mpirun(
        self,
        hosts: list[str],
        args: list[str],
        env_extra: dict[str, str] | None = None,
        bound_s: float = 300,
    ) -> Run:
        cmd, env = self.mpirun_cmd(hosts, args, env_extra)
        return Background(cmd, env).wait(bound_s)

    def horovodrun(
        self,
        hosts: list[str],
        args: list[str],
        env_extra: dict[str, str] | None = None,
        bound_s: float = 300,
    ) -> Run:
        """``horovodrun --gloo -H A:1,B:1,...`` started on the first host; it reaches the
        others with ssh, as on a real cluster (the cluster's sshd and key)."""
        if not self.ssh:
            pytest.skip("the test hosts run no sshd (FORGE_CLUSTER_SSH=0): horovodrun needs ssh")
        cmd = [
            horovodrun_path(),
            "-np",
            str(len(hosts)),
            "-H",
            ",".join(f"{h}:1" for h in hosts),
            "--gloo",
            sys.executable,
            *args,
        ]
        return Background(self.on(hosts[0], cmd), mpi_env(env_extra)).wait(bound_s)

    def files_on(self, host: str) -> list[str]:
        """Every file and folder under ``host``'s /scratch, relative to it."""
        top = self.scratch(host)
        return sorted(str(p.relative_to(top)) for p in top.rglob("*"))
