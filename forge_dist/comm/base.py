"""The communicator protocol every backend implements.

A communicator moves small things between the ranks of one job: float64 vectors
(all-reduced), picklable objects (broadcast from a root, all-gathered) and booleans
(any/all agreement). Every blocking call has a deadline: ``timeout`` seconds, from the
argument, else ``FORGE_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`.
"""

from __future__ import annotations

import math
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from forge_dist.errors import ConfigurationError

DEFAULT_TIMEOUT_S = 600.0
OPS = ("sum", "mean", "min", "max")


def resolve_timeout(timeout: float | None = None) -> float:
    """The deadline in seconds for one collective."""
    if timeout is None:
        text = os.environ.get("FORGE_DIST_TIMEOUT")
        if text is None or not text.strip():
            return DEFAULT_TIMEOUT_S
        try:
            timeout = float(text)
        except ValueError:
            raise ConfigurationError(
                f"FORGE_DIST_TIMEOUT must be a number of seconds, got {text!r}"
            ) from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigurationError(f"timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


#: A pickled object up to this size travels in one collective (a fixed-width row per
#: rank); when any rank's is larger, a second collective sized to the largest follows.
INLINE_BYTES = 4096


def gather_objects(gather_rows: Callable[[Any, str], Any], obj: Any, name: str) -> list[Any]:
    """Every rank's ``obj``, in rank order, over a backend whose one primitive is
    ``gather_rows(int64 row, name) -> rows`` (equal-length rows, rank order). Small
    objects (metrics, decisions) cost one collective, not a size exchange and a payload."""
    import numpy as np

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    row = np.zeros(1 + INLINE_BYTES // 8, dtype=np.int64)
    row[0] = len(data)
    if len(data) <= INLINE_BYTES:
        row.view(np.uint8)[8 : 8 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.asarray(gather_rows(row, name))
    lengths = [int(n) for n in rows[:, 0]]
    if max(lengths) <= INLINE_BYTES:
        return [pickle.loads(rows[r].tobytes()[8 : 8 + n]) for r, n in enumerate(lengths)]
    padded = np.zeros(-(-max(lengths) // 8) * 8, dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.asarray(gather_rows(padded.view(np.int64), f"{name}/large"))
    return [pickle.loads(rows[r].tobytes()[:n]) for r, n in enumerate(lengths)]


def check_op(op: str) -> str:
    if op not in OPS:
        raise ConfigurationError(f"reduction op must be one of {OPS}, got {op!r}")
    return op


def reduce_rows(rows: Sequence[Any], op: str) -> Any:
    """Reduce equal-length float64 vectors in rank order (the same order on every rank,
    so every rank computes bit-identical results)."""
    import numpy as np

    stack = np.stack([np.asarray(r, dtype=np.float64) for r in rows])
    if op == "sum":
        return stack.sum(axis=0)
    if op == "mean":
        return stack.sum(axis=0) / len(rows)
    if op == "min":
        return stack.min(axis=0)
    return stack.max(axis=0)


class Communicator(ABC):
    """Rank, size and deadline-bounded collectives. Same calls, same order, on every rank.

    What a backend can do is declared here, as class attributes that code above the
    communicator asks instead of comparing backend names:

    ``multi_worker``
        The ranks are the workers of one ``tf.distribute`` strategy: training itself is
        a collective of the strategy (MultiWorkerMirroredStrategy).
    ``collective_saves``
        Reading the model's variables may need every rank (MWMS): every rank takes part
        in a save, the non-chief ones into a scratch folder.
    ``averages_gradients``
        The strategy averages gradients itself; ``DistributedOptimizer`` adds nothing.
    ``shares_initial_state``
        Every replica's variables are created from the chief's, so there is nothing to
        broadcast at train begin.
    ``in_graph_allreduce``
        :meth:`graph_allreduce_mean` averages a tensor with an op inside the compiled
        training step (no host round trip).
    """

    backend: str = "?"
    multi_worker: bool = False
    collective_saves: bool = False
    averages_gradients: bool = False
    shares_initial_state: bool = False
    in_graph_allreduce: bool = False

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = resolve_timeout(timeout)

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def allreduce(self, values: Any, op: str = "mean", name: str = "allreduce") -> Any:
        """Element-wise reduction of a float64 vector across ranks; returns a new array."""

    @abstractmethod
    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast") -> Any:
        """``root``'s object on every rank (small, picklable)."""

    @abstractmethod
    def allgather(self, obj: Any, name: str = "allgather") -> list[Any]:
        """Every rank's object, in rank order, on every rank."""

    def barrier(self, name: str = "barrier") -> None:
        self.allgather(None, name=name)

    def any(self, flag: bool, name: str = "any") -> bool:
        return bool(self.allreduce([1.0 if flag else 0.0], op="max", name=name)[0] > 0.5)

    def all(self, flag: bool, name: str = "all") -> bool:
        return bool(self.allreduce([1.0 if flag else 0.0], op="min", name=name)[0] > 0.5)

    def graph_allreduce_mean(self, tensor: Any, compression: str = "none") -> Any:
        """The mean of ``tensor`` across ranks as a TensorFlow op (only where
        ``in_graph_allreduce`` is declared)."""
        raise NotImplementedError(f"the {self.backend!r} communicator has no in-graph all-reduce")

    def in_graph_failure(self, error: BaseException) -> BaseException | None:
        """The error to raise instead of ``error``, a failure of the compiled step, when
        it is this communicator's in-graph all-reduce giving up (a rank died or hung);
        None when it is something else."""
        return None

    def describe(self) -> str:
        return f"{self.backend} rank {self.rank} of {self.size}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}, timeout {self.timeout:g}s>"


class LocalCommunicator(Communicator):
    """One process: every collective returns its own input."""

    backend = "local"

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    def allreduce(self, values: Any, op: str = "mean", name: str = "allreduce") -> Any:
        import numpy as np

        check_op(op)
        return np.array(values, dtype=np.float64, copy=True).reshape(-1)

    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast") -> Any:
        if root != 0:
            raise ConfigurationError(f"root {root} does not exist in a job of size 1")
        return obj

    def allgather(self, obj: Any, name: str = "allgather") -> list[Any]:
        return [obj]
