"""mpi4py backend with deadlines.

Every collective is a star exchange over non-blocking point-to-point messages: each
rank sends ``(sequence, operation, payload)`` to the root, the root checks that all
ranks are at the same operation, reduces, and sends the result back. All waits poll
against the deadline, so the root knows exactly which ranks did not answer and the
others know the root did not. A timed-out communicator is broken: the error is raised,
and at interpreter exit the job is aborted (``MPI_Abort``) instead of hanging in
``MPI_Finalize``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import pickle
import sys
import threading
import time
from typing import Any

from forge_dist.comm.base import Communicator, check_op, reduce_rows
from forge_dist.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    ConfigurationError,
)

log = logging.getLogger("forge_dist.comm")

_TAG_UP = 17001  # rank -> root
_TAG_DOWN = 17002  # root -> rank
_ABORT_CODE = 70
_abort_registered = False


def _register_abort(comm: Any) -> None:
    global _abort_registered
    if _abort_registered:
        return
    _abort_registered = True

    def abort() -> None:
        sys.stderr.flush()
        comm.Abort(_ABORT_CODE)

    atexit.register(abort)


class MPICommunicator(Communicator):
    backend = "mpi"

    def __init__(self, timeout: float | None = None, comm: Any = None) -> None:
        super().__init__(timeout)
        try:
            from mpi4py import MPI
        except ImportError as e:
            from forge_dist.errors import BackendNotInstalledError

            raise BackendNotInstalledError(
                f"the 'mpi' backend needs mpi4py and an MPI library ({e}); "
                "pip install 'forge-dist[mpi]'"
            ) from e
        self._MPI = MPI
        self._comm = comm if comm is not None else MPI.COMM_WORLD
        self._rank = self._comm.Get_rank()
        self._size = self._comm.Get_size()
        self._seq = 0
        self._lock = threading.Lock()
        self._broken: str | None = None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    # -- transport ------------------------------------------------------------
    def _deadline_error(
        self, name: str, missing: list[int], waited: float
    ) -> CollectiveTimeoutError:
        who = ", ".join(str(r) for r in missing)
        msg = (
            f"collective {name!r} timed out after {waited:.1f}s on rank {self._rank}: "
            f"rank(s) {who} did not answer (deadline {self.timeout:g}s, FORGE_DIST_TIMEOUT). "
            "A rank died, hung, or is running different code; the job will abort."
        )
        self._broken = msg
        _register_abort(self._comm)
        log.error(msg)
        return CollectiveTimeoutError(msg, name, missing)

    def _wait_sends(self, reqs: dict[int, Any], name: str, start: float) -> None:
        pause = 0.0
        while reqs:
            for r, req in list(reqs.items()):
                if req.Test():
                    del reqs[r]
            if not reqs:
                return
            waited = time.monotonic() - start
            if waited > self.timeout:
                for req in reqs.values():
                    with contextlib.suppress(Exception):
                        req.Cancel()
                raise self._deadline_error(name, sorted(reqs), waited)
            pause = min(0.002, pause * 2 or 2e-5)
            time.sleep(pause)

    def _recv_from(self, sources: list[int], tag: int, name: str, start: float) -> dict[int, bytes]:
        import numpy as np

        MPI = self._MPI
        got: dict[int, bytes] = {}
        pending = list(sources)
        status = MPI.Status()
        pause = 0.0
        while pending:
            progressed = False
            for src in list(pending):
                if self._comm.Iprobe(source=src, tag=tag, status=status):
                    n = status.Get_count(MPI.BYTE)
                    buf = np.empty(n, dtype=np.uint8)
                    self._comm.Recv([buf, MPI.BYTE], source=src, tag=tag)
                    got[src] = buf.tobytes()
                    pending.remove(src)
                    progressed = True
            if not pending:
                break
            waited = time.monotonic() - start
            if waited > self.timeout:
                raise self._deadline_error(name, pending, waited)
            if progressed:
                pause = 0.0
            else:
                pause = min(0.002, pause * 2 or 2e-5)
                time.sleep(pause)
        return got

    def _isend(self, data: bytes, dest: int, tag: int) -> Any:
        import numpy as np

        buf = np.frombuffer(data, dtype=np.uint8)
        return self._comm.Isend([buf, self._MPI.BYTE], dest=dest, tag=tag)

    def _exchange(self, name: str, payload: Any, combine: Any) -> Any:
        """Send ``payload`` to the root, which calls ``combine({rank: payload})`` and
        returns one result to every rank. Checks every rank is at the same operation."""
        if self._broken:
            raise CollectiveTimeoutError(f"communicator is broken: {self._broken}", name)
        with self._lock:
            self._seq += 1
            seq = self._seq
            start = time.monotonic()
            if self._size == 1:
                return combine({0: payload})
            if self._rank != 0:
                msg = pickle.dumps((seq, name, payload), protocol=pickle.HIGHEST_PROTOCOL)
                self._wait_sends({0: self._isend(msg, 0, _TAG_UP)}, name, start)
                reply = self._recv_from([0], _TAG_DOWN, name, start)[0]
                ok, result = pickle.loads(reply)
            else:
                raw = self._recv_from(list(range(1, self._size)), _TAG_UP, name, start)
                payloads = {0: payload}
                problems = []
                for r, data in sorted(raw.items()):
                    r_seq, r_name, r_payload = pickle.loads(data)
                    if (r_seq, r_name) != (seq, name):
                        problems.append(
                            f"rank {r} is at collective #{r_seq} {r_name!r}, rank 0 at #{seq} "
                            f"{name!r}"
                        )
                    payloads[r] = r_payload
                if problems:
                    ok, result = False, "ranks called different collectives: " + "; ".join(problems)
                else:
                    try:
                        ok, result = True, combine(payloads)
                    except CollectiveMismatchError as e:
                        ok, result = False, str(e)
                reply = pickle.dumps((ok, result), protocol=pickle.HIGHEST_PROTOCOL)
                self._wait_sends(
                    {r: self._isend(reply, r, _TAG_DOWN) for r in range(1, self._size)},
                    name,
                    start,
                )
            if not ok:
                raise CollectiveMismatchError(f"{name}: {result}")
            return result

    # -- collectives -----------------------------------------------------------
    def allreduce(self, values: Any, op: str = "mean", name: str = "allreduce") -> Any:
        import numpy as np

        check_op(op)
        vec = np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))

        def combine(rows: dict[int, Any]) -> Any:
            lengths = {r: len(v) for r, v in rows.items()}
            if len(set(lengths.values())) > 1:
                raise CollectiveMismatchError(f"vector lengths differ across ranks: {lengths}")
            return reduce_rows([rows[r] for r in sorted(rows)], op)

        return np.array(self._exchange(name, vec, combine), dtype=np.float64)

    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast") -> Any:
        if not 0 <= root < self._size:
            raise ConfigurationError(f"root {root} does not exist in a job of size {self._size}")
        mine = obj if self._rank == root else None
        return self._exchange(name, mine, lambda rows: rows[root])

    def allgather(self, obj: Any, name: str = "allgather") -> list[Any]:
        return self._exchange(name, obj, lambda rows: [rows[r] for r in sorted(rows)])
