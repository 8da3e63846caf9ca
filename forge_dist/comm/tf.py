"""``tf`` backend: a tf.distribute strategy.

* MirroredStrategy runs every replica in this one process and Keras already reduces
  metrics across them: a single rank, collectives return their input.
* MultiWorkerMirroredStrategy (one process per worker, ``TF_CONFIG``): ranks are the
  workers in the strategy's replica order (the chief first); collectives are the
  strategy's own all-gathers, bounded by ``CommunicationOptions(timeout_seconds=...)``.
  Every worker must take part in a save there (TensorFlow reads some variables through
  collectives), so this communicator sets ``collective_saves``.
"""

from __future__ import annotations

import threading
from typing import Any

from forge_dist.comm.base import (
    Communicator,
    LocalCommunicator,
    check_op,
    gather_objects,
    reduce_rows,
)
from forge_dist.errors import CollectiveTimeoutError, ConfigurationError


def is_multi_worker(strategy: Any) -> bool:
    name = type(strategy).__name__
    return "MultiWorker" in name or "CollectiveAll" in name


class TFStrategyCommunicator(LocalCommunicator):
    """MirroredStrategy in one process."""

    backend = "tf"
    averages_gradients = True
    shares_initial_state = True

    def __init__(self, timeout: float | None = None, strategy: Any = None) -> None:
        super().__init__(timeout)
        import tensorflow as tf

        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()

    @property
    def num_replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def describe(self) -> str:
        return (
            f"tf rank 0 of 1 ({type(self.strategy).__name__}, "
            f"{self.num_replicas} replicas in this process)"
        )


class MultiWorkerCommunicator(Communicator):
    """MultiWorkerMirroredStrategy: one rank per worker process."""

    backend = "tf"
    multi_worker = True
    collective_saves = True
    averages_gradients = True
    shares_initial_state = True

    def __init__(self, timeout: float | None = None, strategy: Any = None) -> None:
        super().__init__(timeout)
        import tensorflow as tf

        self._tf = tf
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        if not is_multi_worker(self.strategy):
            raise ConfigurationError(
                f"{type(self.strategy).__name__} is not a MultiWorkerMirroredStrategy"
            )
        per_worker = len(self.strategy.extended.worker_devices)
        if per_worker != 1:
            raise ConfigurationError(
                f"forge_dist expects one replica per worker process, found {per_worker}"
            )
        self._options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=self.timeout
        )
        self._lock = threading.Lock()
        self._gather_rows: Any = None  # compiled on first use
        self._size = int(self.strategy.num_replicas_in_sync)
        ids = self.strategy.run(
            lambda: tf.distribute.get_replica_context().replica_id_in_sync_group
        )
        self._rank = int(self.strategy.experimental_local_results(ids)[0])

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def _gather_fn(self) -> Any:
        """The compiled all-gather (tracing one per call costs ~60 ms): each worker's
        row in its own row of a zero matrix, summed in one all-reduce. TensorFlow's
        ``all_gather`` is two collectives (the shapes, then the padded data): ~0.4 ms
        more of a ~4.5 ms MWMS exchange here. Rows travel as int64, so the sum with
        zeros is exact for any bits (a float's -0.0 and NaN payloads included)."""
        tf = self._tf
        if self._gather_rows is None:
            options = self._options

            def replica_fn(t: Any) -> Any:
                ctx = tf.distribute.get_replica_context()
                shape = tf.stack([ctx.num_replicas_in_sync, tf.shape(t, out_type=tf.int32)[0]])
                rows = tf.scatter_nd([[ctx.replica_id_in_sync_group]], t[None], shape)
                return ctx.all_reduce(tf.distribute.ReduceOp.SUM, rows, options=options)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
            def gather(t: Any) -> Any:
                return self.strategy.run(replica_fn, args=(t,))

            self._gather_rows = gather
        return self._gather_rows

    def _gather(self, row: Any, name: str) -> Any:
        """All-gather one equal-length row per worker; rows in rank order, of the dtype
        sent (its bits carried as int64)."""
        import numpy as np

        tf = self._tf
        row = np.ascontiguousarray(row)
        try:
            out = self._gather_fn()(tf.constant(row.view(np.int64)))
            rows = self.strategy.experimental_local_results(out)[0].numpy()
            return rows.view(row.dtype)
        except (
            tf.errors.DeadlineExceededError,
            tf.errors.UnavailableError,
            tf.errors.CancelledError,
            tf.errors.InternalError,
        ) as e:
            msg = (
                f"collective {name!r} failed on worker {self._rank} of {self._size} within "
                f"{self.timeout:g}s (FORGE_DIST_TIMEOUT): a worker died, hung or runs other "
                f"code ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            )
            raise CollectiveTimeoutError(msg, name) from e

    def allreduce(self, values: Any, op: str = "mean", name: str = "allreduce") -> Any:
        import numpy as np

        check_op(op)
        vec = np.asarray(values, dtype=np.float64).reshape(-1)
        with self._lock:
            rows = self._gather(vec, name)
        return reduce_rows(list(rows), op)

    def allgather(self, obj: Any, name: str = "allgather") -> list[Any]:
        with self._lock:
            return gather_objects(self._gather, obj, name)

    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast") -> Any:
        if not 0 <= root < self._size:
            raise ConfigurationError(f"root {root} does not exist in a job of size {self._size}")
        return self.allgather(obj if self._rank == root else None, name)[root]

    def describe(self) -> str:
        return f"tf worker {self._rank} of {self._size} (MultiWorkerMirroredStrategy)"


def make_tf_communicator(timeout: float | None = None) -> Communicator:
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if is_multi_worker(strategy):
        return MultiWorkerCommunicator(timeout, strategy)
    return TFStrategyCommunicator(timeout, strategy)
