"""forge_dist: consistent callbacks and atomic, verifiable checkpoints for distributed Keras.

Importing this package never imports TensorFlow, Horovod or mpi4py.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from forge_dist.errors import ForgeDistError  # noqa: E402


def get_communicator(backend: str = "auto", timeout: float | None = None) -> Any:
    """The process-wide communicator (see :mod:`forge_dist.comm`)."""
    from forge_dist.comm import get_communicator as _get

    return _get(backend, timeout)


__all__ = ["ForgeDistError", "__version__", "get_communicator"]
