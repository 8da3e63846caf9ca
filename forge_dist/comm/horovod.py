"""``horovod`` backend, on ``horovod.tensorflow`` core ops only (they work with Keras 3
and tf_keras alike; Horovod's Keras wrappers are broken on Keras 3).

Deadlines: Horovod's stall check/shutdown and Gloo timeouts are derived from the
communicator's timeout before ``hvd.init()`` (replacing horovodrun's defaults when the
timeout is explicit: an argument or ``FORGE_DIST_TIMEOUT``), so a collective that some
rank never joins makes Horovod shut down instead of waiting forever, and a peer that dies
makes it fail at once. The waiting ranks then raise :class:`CollectiveTimeoutError`
naming the operation (Horovod does not say which rank is missing; its stall warning in
the log does, and horovodrun names a rank that died).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

from forge_dist.comm.base import Communicator, check_op, gather_objects
from forge_dist.errors import BackendNotInstalledError, CollectiveTimeoutError, ConfigurationError

log = logging.getLogger("forge_dist.comm")


def _tf_name(name: str, seq: int) -> str:
    """Horovod names collectives like TF ops: keep it to safe characters, unique by call."""
    return f"forge_dist.{seq}.{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')[:80]}"


class HorovodCommunicator(Communicator):
    backend = "horovod"
    in_graph_allreduce = True

    def __init__(self, timeout: float | None = None) -> None:
        super().__init__(timeout)
        # horovodrun exports its own stall settings (shutdown disabled by default); an
        # explicit forge_dist deadline replaces them, otherwise they only fill gaps.
        explicit = timeout is not None or bool(os.environ.get("FORGE_DIST_TIMEOUT"))
        stall = {
            "HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, int(self.timeout) // 2)),
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(max(1, int(self.timeout))),
            # Gloo's own operation timeout (default 30 s) fires first otherwise.
            "HOROVOD_GLOO_TIMEOUT_SECONDS": str(max(5, int(self.timeout))),
        }
        for var, value in stall.items():
            if explicit or not os.environ.get(var):
                os.environ[var] = value
        try:
            import horovod.tensorflow as hvd
        except ImportError as e:
            raise BackendNotInstalledError(
                f"the 'horovod' backend needs Horovod built with TensorFlow ({e}); "
                "run scripts/build-horovod.sh (make test does)"
            ) from e
        hvd.init()
        self._hvd = hvd
        self._seq = 0
        self._lock = threading.Lock()

    @property
    def rank(self) -> int:
        return int(self._hvd.rank())

    @property
    def size(self) -> int:
        return int(self._hvd.size())

    def _call(self, name: str, fn: Any) -> Any:
        with self._lock:
            self._seq += 1
            op_name = _tf_name(name, self._seq)
            try:
                return fn(op_name)
            except Exception as e:  # HorovodInternalError, tf.errors.*: a peer is gone
                raise self._failed(name, e) from e

    def _failed(self, name: str, e: BaseException) -> CollectiveTimeoutError:
        text = " ".join(str(e).split())[:300]
        msg = (
            f"collective {name!r} failed on rank {self.rank} of {self.size}: a rank "
            f"died, hung past the deadline ({self.timeout:g}s, FORGE_DIST_TIMEOUT) or "
            f"left the job, and Horovod shut down ({type(e).__name__}: {text})"
        )
        log.error(msg)
        return CollectiveTimeoutError(msg, name)

    def in_graph_failure(self, error: BaseException) -> BaseException | None:
        """The gradients' all-reduce inside the compiled step failed because Horovod shut
        down (its stall deadline, or a peer gone): forge_dist's error, naming it."""
        text = str(error)
        if "Horovod has been shut down" not in text and "HorovodInternalError" not in text:
            return None
        return self._failed("DistributedOptimizer(gradients)", error)

    def graph_allreduce_mean(self, tensor: Any, compression: str = "none") -> Any:
        """Horovod's all-reduce as a TF op inside the compiled step (fp16 optional)."""
        hvd = self._hvd
        comp = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
        return hvd.allreduce(tensor, op=hvd.Average, compression=comp, name="forge_dist_gradients")

    def allreduce(self, values: Any, op: str = "mean", name: str = "allreduce") -> Any:
        import numpy as np
        import tensorflow as tf

        check_op(op)
        vec = np.asarray(values, dtype=np.float64).reshape(-1)
        hvd_op = {
            "sum": self._hvd.Sum,
            "mean": self._hvd.Average,
            "min": self._hvd.Min,
            "max": self._hvd.Max,
        }[op]
        return self._call(
            name, lambda n: self._hvd.allreduce(tf.constant(vec), op=hvd_op, name=n).numpy()
        )

    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast") -> Any:
        """One all-gather of a small row (Horovod's ``broadcast_object`` sends the size
        and the payload: two collectives)."""
        if not 0 <= root < self.size:
            raise ConfigurationError(f"root {root} does not exist in a job of size {self.size}")
        return self.allgather(obj if self.rank == root else None, name)[root]

    def allgather(self, obj: Any, name: str = "allgather") -> list[Any]:
        return gather_objects(self._gather_rows, obj, name)

    def _gather_rows(self, row: Any, name: str) -> Any:
        import tensorflow as tf

        return self._call(
            name, lambda n: self._hvd.allgather(tf.constant(row[None]), name=n).numpy()
        )
