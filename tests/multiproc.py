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


def run_bounded(cmd: list[str], env: dict[str, str], bound_s: float) -> Run:
    """Run ``cmd`` in its own process group; fail the test (never hang) past ``bound_s``."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd[:6])} ... did not finish within {bound_s}s:\n"
            + out.decode(errors="replace")[-3000:]
        )
    return Run(proc.returncode, out.decode(errors="replace"), time.monotonic() - t0)


def mpirun(
    np_: int,
    args: list[str],
    env_extra: dict[str, str] | None = None,
    bound_s: float = 240,
    mpi_flags: list[str] | None = None,
) -> Run:
    mpirun = need_mpi()
    env = mpi_env(env_extra)
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
    return run_bounded(cmd, env, bound_s)


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
    """The invariants every launcher must keep (DESIGN.md), checked on two ranks' records."""
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
    forge = os.path.join(BIN, "forge-dist")
    assert subprocess.run([forge, "verify", str(root), "--all"], timeout=60).returncode == 0
