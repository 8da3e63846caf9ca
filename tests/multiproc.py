"""Launching real multi-process jobs from tests, always with a wall-clock bound."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

BIN = os.path.dirname(sys.executable)
HERE = os.path.dirname(os.path.abspath(__file__))


def mpirun_path() -> str | None:
    local = os.path.join(BIN, "mpirun")
    return local if os.path.exists(local) else shutil.which("mpirun")


def need_mpi() -> str:
    pytest.importorskip("mpi4py", reason="mpi4py is in the [mpi] extra that `make test` installs")
    path = mpirun_path()
    if path is None:
        pytest.skip("no mpirun (the [mpi] extra installs Open MPI's wheel)")
    return path


def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            # Open MPI refuses root without these; CI runs as root.
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMP_NUM_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float


class Background:
    """``cmd`` running in its own process group, its output collected in a file."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        import tempfile

        self.cmd = cmd
        self.t0 = time.monotonic()
        self._out = tempfile.TemporaryFile()  # noqa: SIM115  (read while the job runs)
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def output(self) -> str:
        self._out.seek(0)
        return self._out.read().decode(errors="replace")

    def wait(self, bound_s: float) -> Run:
        """Wait for the end; fail the test (never hang) past ``bound_s`` from the start."""
        try:
            self.proc.wait(timeout=max(0.0, bound_s - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(
                f"{' '.join(self.cmd[:6])} ... did not finish within {bound_s}s:\n"
                + self.output()[-3000:]
            )
        return Run(self.proc.returncode, self.output(), time.monotonic() - self.t0)


def run_bounded(cmd: list[str], env: dict[str, str], bound_s: float) -> Run:
    """Run ``cmd`` in its own process group; fail the test (never hang) past ``bound_s``."""
    return Background(cmd, env).wait(bound_s)


def sbatch_env(base: dict[str, str], root: str, epochs: int, train_args: str) -> dict[str, str]:
    """``base`` (with SLURM_CONF) and the FORGE_* settings of slurm/job-common.sh."""
    return dict(
        base,
        FORGE_CHECKPOINT_DIR=root,
        FORGE_EPOCHS=str(epochs),
        FORGE_PYTHON=sys.executable,
        FORGE_TRAIN_ARGS=train_args,
    )


def sbatch_wait(script: str, args: list[str], env: dict[str, str], out_dir: str) -> tuple:
    """``sbatch ARGS --wait slurm/SCRIPT.sbatch`` (bounded), the job's output in
    ``out_dir/job-<id>.out``; ``(the sbatch run, every job output of out_dir)``."""
    repo = os.path.dirname(HERE)
    path = os.path.join(repo, "slurm", f"{script}.sbatch")
    run = run_bounded(["sbatch", *args, "--wait", f"--output={out_dir}/job-%j.out", path], env, 300)
    from pathlib import Path

    logs = "".join(p.read_text() for p in sorted(Path(out_dir).glob("job-*.out")))
    return run, logs


def wait_until(condition, bound_s: float, what: str, job: Background | None = None) -> None:
    """Poll ``condition`` (an outside event: a file, a process) until it holds; fail past
    ``bound_s``, or at once if ``job`` ended first."""
    deadline = time.monotonic() + bound_s
    while not condition():
        if job is not None and job.proc.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{job.output()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {bound_s}s")
        time.sleep(0.1)


def read_rank_reports(template: str, ranks: int = 2, missing_ok: bool = False) -> list[dict]:
    """Each rank's JSON report, from a path ``template`` holding ``{rank}``; with
    ``missing_ok`` the reports that were not written are left out."""
    import json

    out = []
    for r in range(ranks):
        path = str(template).replace("{rank}", str(r))
        if missing_ok and not os.path.exists(path):
            continue
        with open(path) as f:
            out.append(json.load(f))
    return out


def finished_normally(out: str | os.PathLike[str], ranks: int) -> list[int]:
    """The ranks whose report under ``out`` (tests/_mpi_train.py) says they finished:
    a rank that failed writes its report with its error, one that was killed none."""
    reports = read_rank_reports(os.path.join(out, "rank-{rank}.json"), ranks, missing_ok=True)
    return [r["rank"] for r in reports if "error" not in r]


def has_committed_step(root: str | os.PathLike[str]) -> bool:
    """A committed ``step-NNNNNNNN`` folder exists under the local root (staging folders
    carry a ``.tmp-`` suffix)."""
    root = os.fspath(root)
    return os.path.isdir(root) and any(
        n.startswith("step-") and "." not in n for n in os.listdir(root)
    )


def pids_with(marker: str, env_item: str) -> list[int]:
    """Processes whose command line contains ``marker`` and whose environment holds
    ``env_item`` (e.g. ``OMPI_COMM_WORLD_RANK=1``)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            if marker not in cmdline or not cmdline.split(" ", 1)[0].endswith(
                ("python", "python3")
            ):
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if env_item.encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue  # gone, or not ours
    return found


def rank_output(output: str, rank: int) -> str:
    """What one rank printed, from a job run with ``mpirun --output tag`` (lines
    ``[job,rank]<stdout>: ...``)."""
    import re

    tag = re.compile(rf"^\[\d+,{rank}\]<std(?:out|err)>: ?(.*)$")
    return "\n".join(m.group(1) for ln in output.splitlines() if (m := tag.match(ln)))


def mpirun_cmd(
    np_: int,
    args: list[str],
    env_extra: dict[str, str] | None = None,
    mpi_flags: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """``mpirun -np N --oversubscribe python ARGS`` and its environment."""
    mpirun = need_mpi()
    exported = [a for k in (env_extra or {}) for a in ("-x", k)]
    cmd = [
        mpirun,
        "-np",
        str(np_),
        "--oversubscribe",
        *(mpi_flags or []),
        *exported,
        sys.executable,
        *args,
    ]
    return cmd, mpi_env(env_extra)


def mpirun(
    np_: int,
    args: list[str],
    env_extra: dict[str, str] | None = None,
    bound_s: float = 240,
    mpi_flags: list[str] | None = None,
) -> Run:
    cmd, env = mpirun_cmd(np_, args, env_extra, mpi_flags)
    return run_bounded(cmd, env, bound_s)


def tf_config_workers(n: int, args: list[str], env: dict[str, str], bound_s: float) -> list[Run]:
    """``python ARGS`` as ``n`` MultiWorkerMirroredStrategy workers on localhost, each
    with its own ``TF_CONFIG`` and its own output (scripts/launch_mwms.sh interleaves
    them)."""
    import json
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    workers = [f"localhost:{s.getsockname()[1]}" for s in socks]
    for s in socks:
        s.close()
    jobs = []
    for i in range(n):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        jobs.append(Background([sys.executable, *args], {**env, "TF_CONFIG": json.dumps(config)}))
    try:
        return [job.wait(bound_s) for job in jobs]
    finally:
        for job in jobs:
            if job.proc.poll() is None:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()


def horovodrun_path() -> str:
    pytest.importorskip(
        "horovod.tensorflow", reason="Horovod is built by scripts/build-horovod.sh (make test)"
    )
    local = os.path.join(BIN, "horovodrun")
    path = local if os.path.exists(local) else shutil.which("horovodrun")
    if path is None:
        pytest.skip("no horovodrun")
    return path


def horovodrun(
    np_: int, args: list[str], env_extra: dict[str, str] | None = None, bound_s: float = 240
) -> Run:
    """``horovodrun -np N -H localhost:N --gloo python ARGS`` with a wall-clock bound."""
    cmd = [
        horovodrun_path(),
        "-np",
        str(np_),
        "-H",
        f"localhost:{np_}",
        "--gloo",
        sys.executable,
        *args,
    ]
    return run_bounded(cmd, mpi_env(env_extra), bound_s)


def assert_ranks_consistent(r0: dict, r1: dict, root: str, epochs: int) -> None:
    """The invariants every launcher must keep (docs/DESIGN.md), checked on two ranks' records."""
    import subprocess

    from forge_dist.storage import CheckpointStore

    assert r0["epochs_run"] == r1["epochs_run"] < epochs, "same stop epoch, and it stopped"
    assert r0["stopped_epoch"] == r1["stopped_epoch"] > 0
    assert r0["fingerprints"] == r1["fingerprints"], "identical weights after every epoch"
    assert r0["lrs"] == r1["lrs"] and r0["lrs"][-1] < r0["lrs"][0]
    assert r0["final_fingerprint"] == r1["final_fingerprint"]
    assert r0["final_fingerprint"] == r0["fingerprints"][r0["best_epoch"]]
    assert r1["touched"] == [] and r0["touched"], "exactly one writer"
    store = CheckpointStore(str(root))
    assert {c.manifest.writer["rank"] for c in store.list()} == {0}
    assert_chief_tensorboard(os.path.join(str(root), "tb"), r0, r1)
    forge = os.path.join(BIN, "forge-dist")
    assert subprocess.run([forge, "verify", str(root), "--all"], timeout=60).returncode == 0


def assert_chief_tensorboard(log_dir: str, r0: dict, r1: dict) -> None:
    """Only the chief's process wrote event files, and their validation scalars are the
    synced values every rank recorded."""
    from forge_dist.keras.tb_events import scalar_values

    pids = {f.split(".")[5] for _, _, fs in os.walk(log_dir) for f in fs if "tfevents" in f}
    assert pids == {str(r0["pid"])}, (pids, r0["pid"], r1["pid"])
    val = scalar_values(os.path.join(log_dir, "validation"))["epoch_loss"]
    assert [s for s, _ in val] == list(range(len(r0["val_losses"])))
    assert [v for _, v in val] == [pytest.approx(x, rel=1e-6) for x in r0["val_losses"]]
    assert r0["val_losses"] == r1["val_losses"]
