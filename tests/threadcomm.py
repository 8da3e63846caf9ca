"""A fake communicator simulating N ranks with threads of one process (unit-test tier).

It follows the same protocol as the real backends, so callbacks can be exercised with
per-rank inputs without launching processes; real behaviour is tested under mpirun.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from forge_dist.comm.base import Communicator, check_op, reduce_rows
from forge_dist.errors import CollectiveMismatchError, CollectiveTimeoutError


class _Group:
    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size)


class ThreadComm(Communicator):
    backend = "threads"

    def __init__(self, group: _Group, rank: int) -> None:
        super().__init__(group.timeout)
        self._group = group
        self._rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._group.size

    def _exchange(self, name: str, payload: Any) -> list[Any]:
        g = self._group
        try:
            g.barrier.wait(g.timeout)
            g.slots[self._rank] = (name, payload)
            g.barrier.wait(g.timeout)
            rows = list(g.slots)
            g.barrier.wait(g.timeout)
        except threading.BrokenBarrierError:
            raise CollectiveTimeoutError(f"{name} timed out", name) from None
        names = {r[0] for r in rows}
        if len(names) > 1:
            raise CollectiveMismatchError(f"ranks called different collectives: {sorted(names)}")
        return [r[1] for r in rows]

    def allreduce(self, values: Any, op: str = "mean", name: str = "allreduce") -> Any:
        import numpy as np

        check_op(op)
        rows = self._exchange(name, np.asarray(values, dtype=np.float64).reshape(-1))
        return reduce_rows(rows, op)

    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast") -> Any:
        return self._exchange(name, obj)[root]

    def allgather(self, obj: Any, name: str = "allgather") -> list[Any]:
        return self._exchange(name, obj)


def run_ranks(size: int, fn: Callable[[Communicator], Any], timeout: float = 10.0) -> list[Any]:
    """Run ``fn(comm)`` on ``size`` simulated ranks; return results or exceptions."""
    group = _Group(size, timeout)
    results: list[Any] = [None] * size

    def target(r: int) -> None:
        try:
            results[r] = fn(ThreadComm(group, r))
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[r] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    return results
