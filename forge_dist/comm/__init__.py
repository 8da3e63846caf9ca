"""Communicators: rank, size and deadline-bounded collectives (local, mpi, horovod, tf).

``get_communicator("auto")`` picks from the environment and logs why at debug level.
Heavy imports (mpi4py, TensorFlow) happen only inside the backend that needs them.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from forge_dist.comm.base import DEFAULT_TIMEOUT_S, Communicator, LocalCommunicator
from forge_dist.errors import ConfigurationError

log = logging.getLogger("forge_dist.comm")

BACKENDS = ("auto", "local", "mpi", "tf", "horovod")
_lock = threading.Lock()
_current: Communicator | None = None


def _env_world_size() -> tuple[int, str] | None:
    """World size a launcher advertises, and which variable said so."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v), var
    return None


def _horovod_initialised() -> bool:
    hvd = sys.modules.get("horovod.tensorflow")
    try:
        return bool(hvd is not None and hvd.is_initialized())
    except Exception:  # pragma: no cover - a broken Horovod install
        return False


def detect_backend() -> tuple[str, str]:
    """``(backend, reason)`` for ``"auto"``."""
    if os.environ.get("HOROVOD_RANK") is not None and os.environ.get("HOROVOD_SIZE"):
        return "horovod", f"HOROVOD_RANK={os.environ['HOROVOD_RANK']} (started by horovodrun)"
    if _horovod_initialised():
        return "horovod", "horovod.tensorflow is imported and initialised"
    env = _env_world_size()
    if env is not None and env[0] > 1:
        return "mpi", f"{env[1]}={env[0]} (started by an MPI launcher)"
    slurm = os.environ.get("SLURM_NTASKS")
    if slurm and slurm.isdigit() and int(slurm) > 1 and "SLURM_PROCID" in os.environ:
        return "mpi", f"SLURM_NTASKS={slurm} (a SLURM step with several tasks)"
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        try:
            if tf.distribute.has_strategy():
                name = type(tf.distribute.get_strategy()).__name__
                return "tf", f"an active tf.distribute strategy ({name})"
        except Exception:  # pragma: no cover - very old TF
            pass
    return "local", "no MPI launcher, SLURM step or tf.distribute strategy found"


def _create(backend: str, timeout: float | None) -> Communicator:
    if backend == "local":
        return LocalCommunicator(timeout)
    if backend == "mpi":
        from forge_dist.comm.mpi import MPICommunicator

        comm = MPICommunicator(timeout)
        slurm = os.environ.get("SLURM_NTASKS")
        if comm.size == 1 and slurm and slurm.isdigit() and int(slurm) > 1:
            raise ConfigurationError(
                f"SLURM started {slurm} tasks but MPI sees a world of 1: each task is an "
                "MPI singleton. Launch with `srun --mpi=pmix` or `mpirun` inside the "
                "allocation."
            )
        return comm
    if backend == "tf":
        from forge_dist.comm.tf import make_tf_communicator

        return make_tf_communicator(timeout)
    if backend == "horovod":
        from forge_dist.comm.horovod import HorovodCommunicator

        return HorovodCommunicator(timeout)
    raise ConfigurationError(f"backend must be one of {BACKENDS}, got {backend!r}")


def get_communicator(backend: str = "auto", timeout: float | None = None) -> Communicator:
    """The process-wide communicator. The first call fixes the backend; asking later for a
    different one is an error (``"auto"`` always returns the existing one)."""
    global _current
    if backend not in BACKENDS:
        raise ConfigurationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with _lock:
        if _current is not None:
            if backend not in ("auto", _current.backend):
                raise ConfigurationError(
                    f"this process already uses the {_current.backend!r} communicator; "
                    f"cannot switch to {backend!r}"
                )
            return _current
        chosen, reason = (backend, "asked for explicitly")
        if backend == "auto":
            chosen, reason = detect_backend()
        _current = _create(chosen, timeout)
        log.debug("communicator %s: %s", _current.describe(), reason)
        return _current


def set_communicator(comm: Communicator | None) -> None:
    """Install ``comm`` as the process-wide communicator (None resets; for tests)."""
    global _current
    with _lock:
        _current = comm


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Communicator",
    "LocalCommunicator",
    "detect_backend",
    "get_communicator",
    "set_communicator",
]
