"""Communicators: rank, size and deadline-bounded collectives (local, mpi, horovod, tf).

``get_communicator("auto")`` picks from the environment and logs why at debug level.
Heavy imports (mpi4py, TensorFlow) happen only inside the backend that needs them.
"""

from __future__ import annotations

import logging
import sys
import threading

from forge_dist._launch import launch_environment
from forge_dist.comm.agree import agree
from forge_dist.comm.base import DEFAULT_TIMEOUT_S, Communicator, LocalCommunicator
from forge_dist.errors import ConfigurationError

log = logging.getLogger("forge_dist.comm")

BACKENDS = ("auto", "local", "mpi", "tf", "horovod")
_lock = threading.Lock()
_current: Communicator | None = None


def _horovod_initialised() -> bool:
    hvd = sys.modules.get("horovod.tensorflow")
    try:
        return bool(hvd is not None and hvd.is_initialized())
    except Exception:  # pragma: no cover - a broken Horovod install
        return False


def detect_backend() -> tuple[str, str]:
    """``(backend, reason)`` for ``"auto"``."""
    launch = launch_environment()
    if launch.launcher == "horovodrun":
        return "horovod", f"HOROVOD_RANK={launch.rank} (started by horovodrun)"
    if _horovod_initialised():
        return "horovod", "horovod.tensorflow is imported and initialised"
    if launch.launcher == "mpi" and launch.size > 1:
        return "mpi", f"{launch.variable}={launch.size} (started by an MPI launcher)"
    if launch.launcher == "slurm" and launch.size > 1:
        return "mpi", f"SLURM_NTASKS={launch.size} (a SLURM step with several tasks)"
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
        launch = launch_environment()
        if comm.size == 1 and launch.launcher == "slurm" and launch.size > 1:
            raise ConfigurationError(
                f"SLURM started {launch.size} tasks but MPI sees a world of 1: each task is an "
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
    "agree",
    "Communicator",
    "LocalCommunicator",
    "detect_backend",
    "get_communicator",
    "set_communicator",
]
