"""mpi4py backend with deadlines.

* Objects (broadcast, allgather) travel as a star of non-blocking point-to-point
  messages: each rank sends ``(sequence, operation, payload)`` to the root, which checks
  that every rank is at the same operation and answers everyone.
* Vectors (allreduce, the gradient path) use MPI's own non-blocking ``Iallreduce``, after
  a tiny ``Iallreduce`` that checks every rank is at the same call with the same length.

Every wait polls against the deadline. On a timeout rank 0 holds a roll call (every
polling rank answers it), so the error names the ranks that did not answer and their
hosts, and then tells the ranks that did answer that it gave up: each of them raises its
own error at its next poll instead of waiting out its own deadline. Another rank that
times out roll-calls rank 0 alone and, if it answers, waits for its verdict: a first
message to a rank never talked to may block while that rank's host is cut off. A timed-out
communicator is broken: the error is raised, and at interpreter exit the job is
aborted (``MPI_Abort``) instead of hanging in ``MPI_Finalize``. At exit (its traceback
printed) a rank that was told says so to the rank that told it and leaves the abort to
that one, which aborts once every rank it told has said so (or after a few seconds): no
survivor is killed by another's abort before its own error is out.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import pickle
import socket
import sys
import threading
import time
from typing import Any

from forge_dist.comm.base import Communicator, check_op
from forge_dist.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    ConfigurationError,
    RankFailedError,
)

log = logging.getLogger("forge_dist.comm")

_TAG_UP = 17001  # rank -> root
_TAG_DOWN = 17002  # root -> rank
_TAG_ROLLCALL = 17003  # "are you there?" after a timeout
_TAG_PRESENT = 17004  # the answer
_TAG_GAVE_UP = 17005  # "I timed out; the job will abort" (payload: the ranks missing)
_TAG_HEARD = 17006  # "my own error is out": the aborting rank may go on
_TAG_FAILED = 17007  # "I raised an error outside any collective" (payload: its text)
_ROLLCALL_S = 5.0  # how long a roll call waits for answers
_HEARD_S = 5.0  # how long the abort at exit waits for the ranks it told
_ABORT_CODE = 70


_SPIN_S = 0.002  # poll without sleeping this long: most answers come within it


def _backoff(pause: float, start: float) -> float:
    """Wait a little before polling again: yield the CPU for the first milliseconds
    (answers usually arrive by then), then sleep with a growing pause up to 1 ms."""
    if time.monotonic() - start < _SPIN_S:
        time.sleep(0)
        return 0.0
    pause = min(0.001, pause * 2 or 2e-5)
    time.sleep(pause)
    return pause


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
        self._replies: list[Any] = []  # roll-call answers and notices in flight
        self._gave_up: list[tuple[int, list[int]]] = []  # (rank, its missing) not yet raised
        self._tellers: set[int] = set()  # ranks that told this one: owed "heard" at exit
        self._told: set[int] = set()  # ranks this one told, not yet heard from
        self._abandoned: list[Any] = []  # requests of collectives given up: never freed
        self._abort_registered = False
        self._failed: list[tuple[int, str]] = []  # (rank, its error) said before exiting
        # Every rank's host, learned in the first object collective: errors name the
        # host of a rank that stopped answering (a node down, a link cut).
        self._hosts: list[str] | None = None
        if self._size > 1:
            self._hook_uncaught()

    def _hook_uncaught(self) -> None:
        """An error this rank raises outside any collective (a bad argument on this rank
        alone) would leave the others waiting in their next collective until the
        deadline, this rank stuck in ``MPI_Finalize`` meanwhile: after its traceback is
        out, tell every other rank, which then raise at once (:class:`RankFailedError`)."""
        previous = sys.excepthook

        def hook(exc_type: Any, exc: Any, tb: Any) -> None:
            previous(exc_type, exc, tb)
            if self._broken is None and not isinstance(exc, KeyboardInterrupt):
                with contextlib.suppress(Exception):
                    self._tell_failed(f"{exc_type.__name__}: {exc}")

        sys.excepthook = hook

    def _tell_failed(self, text: str) -> None:
        import numpy as np

        data = np.frombuffer(" ".join(text.split())[:2000].encode(), dtype=np.uint8).copy()
        for r in range(self._size):
            if r != self._rank:  # small messages: sent eagerly, nothing to wait for
                self._replies.append(
                    (self._comm.Isend([data, self._MPI.BYTE], dest=r, tag=_TAG_FAILED), data)
                )

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    # -- roll call ------------------------------------------------------------
    def _answer_rollcalls(self) -> None:
        """Tell any rank holding a roll call that this one is alive, and take in the
        notices of ranks that gave up (called while polling)."""
        import numpy as np

        MPI = self._MPI
        status = MPI.Status()
        while self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_ROLLCALL, status=status):
            src = status.Get_source()
            buf = np.empty(1, dtype=np.int64)
            self._comm.Recv([buf, MPI.INT64_T], source=src, tag=_TAG_ROLLCALL)
            self._send_ints([self._rank], src, _TAG_PRESENT)
        while self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_GAVE_UP, status=status):
            src = status.Get_source()
            buf = np.empty(status.Get_count(MPI.INT64_T), dtype=np.int64)
            self._comm.Recv([buf, MPI.INT64_T], source=src, tag=_TAG_GAVE_UP)
            self._gave_up.append((src, buf.tolist()))
        while self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_FAILED, status=status):
            src = status.Get_source()
            raw = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
            self._comm.Recv([raw, MPI.BYTE], source=src, tag=_TAG_FAILED)
            self._failed.append((src, raw.tobytes().decode(errors="replace")))
        self._replies = [(r, b) for r, b in self._replies if not r.Test()]

    def _send_ints(self, values: list[int], dest: int, tag: int) -> None:
        import numpy as np

        buf = np.array(values, dtype=np.int64)
        self._replies.append((self._comm.Isend([buf, self._MPI.INT64_T], dest=dest, tag=tag), buf))

    def _poll(self, name: str, start: float) -> None:
        """Between two looks at a pending operation: answer roll calls; if another rank
        gave up on the job meanwhile, stop waiting and raise this rank's own error."""
        self._answer_rollcalls()
        if self._failed:
            src, text = self._failed[0]
            self._broken = (
                f"collective {name!r} given up on rank {self._rank}: rank {src}"
                f"{self._on([src])} failed before reaching it ({text}); every rank stops"
            )
            log.error(self._broken)
            raise RankFailedError(self._broken)
        if self._gave_up:
            src, missing = self._gave_up[0]
            found = (
                f"rank(s) {', '.join(str(r) for r in missing)} did not answer{self._on(missing)}"
                if missing
                else "every rank answered, in other collectives (a diverged code path)"
            )
            msg = (
                f"collective {name!r} given up on rank {self._rank} after "
                f"{time.monotonic() - start:.1f}s: rank {src}{self._on([src])} timed out (deadline "
                f"{self.timeout:g}s, FORGE_DIST_TIMEOUT) and found that {found}. A rank "
                "died, hung, or is running different code; the job will abort."
            )
            raise self._broken_error(msg, name, missing)

    def _rollcall(self, others: list[int]) -> list[int]:
        """Those of ``others`` that do not answer within a few seconds (dead, hung, busy
        elsewhere, or cut off)."""
        import numpy as np

        MPI = self._MPI
        ping = np.array([self._rank], dtype=np.int64)
        sends = [self._comm.Isend([ping, MPI.INT64_T], dest=r, tag=_TAG_ROLLCALL) for r in others]
        missing = set(others)
        end = time.monotonic() + min(_ROLLCALL_S, self.timeout)
        status = MPI.Status()
        while missing and time.monotonic() < end:
            self._answer_rollcalls()
            for r in list(missing):
                if self._comm.Iprobe(source=r, tag=_TAG_PRESENT, status=status):
                    buf = np.empty(1, dtype=np.int64)
                    self._comm.Recv([buf, MPI.INT64_T], source=r, tag=_TAG_PRESENT)
                    missing.discard(r)
            time.sleep(0.001)
        for req in sends:
            with contextlib.suppress(Exception):
                req.Cancel()
        return sorted(missing)

    def _timed_out(self, name: str, start: float, waited: float) -> CollectiveTimeoutError:
        """The deadline passed: find who is missing, and the error to raise.

        The root roll-calls every rank: each has talked with it (every object collective
        goes through the root). Any other rank roll-calls the root only, and if the root
        answers, waits a little for its verdict (the root is in the same collective and
        times out too): a first message to a rank never talked to can block in MPI's
        address lookup while that rank's host is unreachable (Open MPI 5 across hosts:
        a cut link left the roll call stuck until the job was aborted). Only if the
        root says nothing does it roll-call the others itself."""
        if self._rank == 0:
            return self._deadline_error(name, list(range(1, self._size)), waited)
        if self._rollcall([0]):
            return self._deadline_error(name, [0], waited, missing=[0])
        end = time.monotonic() + 2 * _ROLLCALL_S
        while time.monotonic() < end:
            self._poll(name, start)  # raises once the root has said who is missing
            time.sleep(0.01)
        # The root is alive but not (yet) timed out: it entered later, or elsewhere.
        others = [r for r in range(1, self._size) if r != self._rank]
        return self._deadline_error(name, [0, *others], waited, missing=self._rollcall(others))

    # -- transport ------------------------------------------------------------
    def _deadline_error(
        self, name: str, called: list[int], waited: float, missing: list[int] | None = None
    ) -> CollectiveTimeoutError:
        """Roll-call ``called`` (unless ``missing`` already says who did not answer),
        mark the communicator broken (the job aborts at exit), tell the ranks that
        answered, and build the error."""
        if missing is None:
            missing = self._rollcall(called)
        where = f"collective {name!r} timed out after {waited:.1f}s on rank {self._rank}"
        if missing:
            who = ", ".join(str(r) for r in missing)
            msg = (
                f"{where}: rank(s) {who} did not answer{self._on(missing)} (deadline "
                f"{self.timeout:g}s, "
                "FORGE_DIST_TIMEOUT). A rank died, hung, or is running different code; "
                "the job will abort."
            )
        else:
            msg = (
                f"{where}, yet every rank answered the roll call: they are in different "
                "collectives (a diverged code path); the job will abort."
            )
        error = self._broken_error(msg, name, missing)  # (said before anyone is told)
        live = set(called) - set(missing) - self._tellers
        for r in sorted(live):
            self._send_ints(list(missing), r, _TAG_GAVE_UP)
            self._told.add(r)
        return error

    def _on(self, ranks: list[int]) -> str:
        """Where ``ranks`` run, for an error: " (on host H)" or " (1 on H1, 2 on H2)";
        nothing before the first object collective taught every rank the hosts."""
        if not self._hosts or not ranks:
            return ""
        if len({self._hosts[r] for r in ranks}) == 1:
            return f" (on host {self._hosts[ranks[0]]})"
        return " (" + ", ".join(f"{r} on {self._hosts[r]}" for r in ranks) + ")"

    def _broken_error(self, msg: str, name: str, missing: list[int]) -> CollectiveTimeoutError:
        """This rank's error: said at once, the communicator marked broken, and the abort
        registered for interpreter exit."""
        self._broken = msg
        log.error(msg)
        sys.stderr.flush()
        self._tellers.update(src for src, _ in self._gave_up)
        self._gave_up.clear()
        if not self._abort_registered:
            self._abort_registered = True
            atexit.register(self._abort)
        return CollectiveTimeoutError(msg, name, missing)

    def _abort(self) -> None:
        """At exit, after a timeout (this rank's traceback is out by now): tell the ranks
        that told this one; wait until the ranks this one told have said theirs; a rank
        that was told then leaves the abort to its teller (its own would kill ranks still
        printing). Bounded: the job is aborted in any case."""
        import numpy as np

        MPI = self._MPI
        status = MPI.Status()
        try:
            for src in sorted(self._tellers):
                self._send_ints([self._rank], src, _TAG_HEARD)
            end = time.monotonic() + _HEARD_S * (2 if self._tellers else 1)
            while (self._told or self._tellers) and time.monotonic() < end:
                self._answer_rollcalls()
                for src, _ in self._gave_up:  # it gave up too, and is at its own exit soon
                    self._send_ints([self._rank], src, _TAG_HEARD)
                self._gave_up.clear()
                while self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_HEARD, status=status):
                    buf = np.empty(1, dtype=np.int64)
                    self._comm.Recv([buf, MPI.INT64_T], source=status.Get_source(), tag=_TAG_HEARD)
                    self._told.discard(int(buf[0]))
                time.sleep(0.001)
        finally:
            sys.stderr.flush()
            self._comm.Abort(_ABORT_CODE)

    def _wait_sends(self, reqs: dict[int, Any], name: str, start: float) -> None:
        pause = 0.0
        try:
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
                    raise self._timed_out(name, start, waited)
                self._poll(name, start)
                pause = _backoff(pause, start)
        except CollectiveTimeoutError:
            self._abandoned += reqs.values()  # MPI may still use them: never freed
            raise

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
                raise self._timed_out(name, start, waited)
            self._poll(name, start)
            pause = 0.0 if progressed else _backoff(pause, start)
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
            # The first exchange also carries each rank's host up, and the table down.
            host = socket.gethostname() if self._hosts is None else None
            if self._rank != 0:
                msg = pickle.dumps((seq, name, payload, host), protocol=pickle.HIGHEST_PROTOCOL)
                self._wait_sends({0: self._isend(msg, 0, _TAG_UP)}, name, start)
                reply = self._recv_from([0], _TAG_DOWN, name, start)[0]
                ok, result, hosts = pickle.loads(reply)
                self._hosts = hosts or self._hosts
            else:
                raw = self._recv_from(list(range(1, self._size)), _TAG_UP, name, start)
                payloads = {0: payload}
                problems = []
                hosts = [host] * self._size if host is not None else None
                for r, data in sorted(raw.items()):
                    r_seq, r_name, r_payload, r_host = pickle.loads(data)
                    if hosts is not None:
                        hosts[r] = r_host
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
                self._hosts = hosts or self._hosts
                reply = pickle.dumps((ok, result, hosts), protocol=pickle.HIGHEST_PROTOCOL)
                self._wait_sends(
                    {r: self._isend(reply, r, _TAG_DOWN) for r in range(1, self._size)},
                    name,
                    start,
                )
            if not ok:
                raise CollectiveMismatchError(f"{name}: {result}")
            return result

    # -- collectives -----------------------------------------------------------
    def _wait_request(self, req: Any, name: str, start: float) -> None:
        pause = 0.0
        try:
            while not req.Test():
                waited = time.monotonic() - start
                if waited > self.timeout:
                    raise self._timed_out(name, start, waited)
                self._poll(name, start)
                pause = _backoff(pause, start)
        except CollectiveTimeoutError:
            self._abandoned.append(req)  # an active collective's request: never freed
            raise

    def allreduce(self, values: Any, op: str = "mean", name: str = "allreduce") -> Any:
        import zlib

        import numpy as np

        check_op(op)
        vec = np.array(values, dtype=np.float64, copy=True).reshape(-1)
        if self._broken:
            raise CollectiveTimeoutError(f"communicator is broken: {self._broken}", name)
        if self._size == 1:
            return vec
        MPI = self._MPI
        with self._lock:
            self._seq += 1
            start = time.monotonic()
            # 1. Are all ranks at the same call, with the same length? (max of x and -x
            #    gives max and min in one tiny reduction.)
            tag = zlib.crc32(f"{name}/{op}".encode()) & 0x7FFFFFFF
            probe = np.array([self._seq, len(vec), tag], dtype=np.float64)
            # A max or min rides along in the same reduction (min as max of -x): one
            # round trip for any()/all(), the check the training loop makes every batch.
            ride = {"max": vec, "min": -vec}.get(op)
            both = np.concatenate([probe, -probe, ride if ride is not None else []])
            req = self._comm.Iallreduce(MPI.IN_PLACE, both, op=MPI.MAX)
            self._wait_request(req, name, start)
            hi, lo = both[:3], -both[3:6]
            if not np.array_equal(hi, lo):
                what = ["call sequence", "vector length", "operation"][
                    int(np.flatnonzero(hi != lo)[0])
                ]
                raise CollectiveMismatchError(
                    f"{name}: ranks differ in {what} (from {lo.tolist()} to {hi.tolist()}: "
                    "[sequence, length, operation]) — they are not running the same code path"
                )
            if ride is not None:
                return both[6:] if op == "max" else -both[6:]
            # 2. The reduction itself, by MPI.
            req = self._comm.Iallreduce(MPI.IN_PLACE, vec, op=MPI.SUM)
            self._wait_request(req, name, start)
        if op == "mean":
            vec /= self._size
        return vec

    def broadcast(self, obj: Any, root: int = 0, name: str = "broadcast") -> Any:
        if not 0 <= root < self._size:
            raise ConfigurationError(f"root {root} does not exist in a job of size {self._size}")
        mine = obj if self._rank == root else None
        return self._exchange(name, mine, lambda rows: rows[root])

    def allgather(self, obj: Any, name: str = "allgather") -> list[Any]:
        return self._exchange(name, obj, lambda rows: [rows[r] for r in sorted(rows)])
