"""Communicator selection, timeouts and the local backend."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from forge_dist import comm as comm_mod
from forge_dist.comm import LocalCommunicator, detect_backend, get_communicator, set_communicator
from forge_dist.comm.base import DEFAULT_TIMEOUT_S, resolve_timeout
from forge_dist.errors import ConfigurationError


@pytest.fixture(autouse=True)
def fresh_communicator():
    set_communicator(None)
    yield
    set_communicator(None)


def test_timeout_from_argument_environment_or_default(monkeypatch):
    monkeypatch.delenv("FORGE_DIST_TIMEOUT", raising=False)
    assert resolve_timeout() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("FORGE_DIST_TIMEOUT", "42.5")
    assert resolve_timeout() == 42.5
    assert resolve_timeout(3) == 3.0
    for bad in ("soon", "-1", "0", "inf"):
        monkeypatch.setenv("FORGE_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigurationError, match="FORGE_DIST_TIMEOUT|positive"):
            resolve_timeout()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "local"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
        ({"PMI_SIZE": "4"}, "mpi"),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, "local"),
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "mpi"),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, "local"),
        ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, "horovod"),
        ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "horovod"),
    ],
)
def test_auto_detection_from_the_launcher(monkeypatch, env, expected):
    for var in (
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS",
        "SLURM_PROCID",
    ):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    backend, reason = detect_backend()
    assert backend == expected and reason


def test_the_first_call_fixes_the_backend(monkeypatch):
    monkeypatch.setattr(comm_mod, "detect_backend", lambda: ("local", "test"))
    c = get_communicator()
    assert isinstance(c, LocalCommunicator) and get_communicator("auto") is c
    assert get_communicator("local") is c
    with pytest.raises(ConfigurationError, match="cannot switch to 'mpi'"):
        get_communicator("mpi")
    with pytest.raises(ConfigurationError, match="backend must be one of"):
        get_communicator("nccl")


def test_local_collectives_return_their_input():
    c = LocalCommunicator(timeout=5)
    assert c.rank == 0 and c.size == 1 and c.is_chief
    np.testing.assert_array_equal(c.allreduce([1, 2.5], op="max"), [1.0, 2.5])
    assert c.broadcast({"a": 1}) == {"a": 1}
    assert c.allgather(3) == [3]
    assert c.any(True) and not c.all(False)
    with pytest.raises(ConfigurationError):
        c.allreduce([1.0], op="median")
    with pytest.raises(ConfigurationError):
        c.broadcast(1, root=1)


def test_slurm_tasks_that_mpi_sees_as_singletons_are_refused():
    pytest.importorskip("mpi4py")
    code = (
        "from forge_dist.comm import get_communicator\n"
        "try:\n"
        "    get_communicator('mpi')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = dict(
        os.environ,
        SLURM_NTASKS="2",
        SLURM_PROCID="0",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "ConfigurationError" in out.stdout and "singleton" in out.stdout, out.stderr[-2000:]


def test_backends_declare_what_they_can_do():
    """Code above comm/ asks these instead of comparing backend names."""
    from forge_dist.comm.horovod import HorovodCommunicator
    from forge_dist.comm.mpi import MPICommunicator
    from forge_dist.comm.tf import MultiWorkerCommunicator, TFStrategyCommunicator

    caps = (
        "multi_worker",
        "collective_saves",
        "averages_gradients",
        "shares_initial_state",
        "in_graph_allreduce",
    )

    def declared(cls):
        return {c for c in caps if getattr(cls, c)}

    assert declared(LocalCommunicator) == declared(MPICommunicator) == set()
    assert declared(HorovodCommunicator) == {"in_graph_allreduce"}
    assert declared(TFStrategyCommunicator) == {"averages_gradients", "shares_initial_state"}
    assert declared(MultiWorkerCommunicator) == set(caps) - {"in_graph_allreduce"}
    with pytest.raises(NotImplementedError, match="no in-graph all-reduce"):
        LocalCommunicator().graph_allreduce_mean([1.0])


def test_agree_returns_the_chiefs_result_or_raises_its_error_everywhere():
    from threadcomm import run_ranks

    from forge_dist.comm import agree
    from forge_dist.errors import ForgeDistError

    def decide_on(comm):
        return agree(comm, "pick", lambda: f"chose on rank {comm.rank}")

    assert run_ranks(2, decide_on) == ["chose on rank 0", "chose on rank 0"]

    def fail_on(comm):
        def decide():
            raise ConfigurationError("bad monitor")

        return agree(comm, "decide", decide)

    errors = run_ranks(2, fail_on)
    assert all(isinstance(e, ConfigurationError) for e in errors), errors
    assert "bad monitor" in str(errors[0]) and "decide failed on rank 0" in str(errors[1])

    def storage_fails(comm):
        return agree(comm, "save", lambda: (_ for _ in ()).throw(OSError("disk full")))

    errors = run_ranks(2, storage_fails)
    assert isinstance(errors[0], OSError)
    assert isinstance(errors[1], ForgeDistError) and "OSError: disk full" in str(errors[1])


def test_small_objects_cost_one_collective_and_large_ones_two():
    """``gather_objects`` (the Horovod and MWMS backends' object path) over 3 simulated
    ranks whose one primitive gathers equal-length int64 rows."""
    from threadcomm import run_ranks

    from forge_dist.comm.base import INLINE_BYTES, gather_objects

    def run(comm, sizes):
        calls = []

        def gather_rows(row, name):
            calls.append((name, row.dtype.str, len(row)))
            rows = comm.allgather(row, name=name)
            assert len({len(r) for r in rows}) == 1  # equal-length rows, as backends need
            return np.stack(rows)

        obj = {"rank": comm.rank, "blob": b"x" * sizes[comm.rank]}
        return gather_objects(gather_rows, obj, "t"), calls

    for sizes, n_calls in (([10, 200, 3], 1), ([10, INLINE_BYTES * 3, 3], 2)):
        results = run_ranks(3, lambda c, s=sizes: run(c, s))
        for got, calls in results:
            assert [o["rank"] for o in got] == [0, 1, 2]
            assert [len(o["blob"]) for o in got] == sizes
            assert len(calls) == n_calls
            assert all(dtype == "<i8" for _, dtype, _ in calls)
