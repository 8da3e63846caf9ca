"""Every rank reads the step the chief picked: ``restore_latest(read_on="every_rank")``.

The chief still decides (lists the root, skips what does not verify, checks the model,
reads the callbacks' state), but each step it tries is read by every rank at once, each
hashing every byte against the manifest the chief read. Only what a rank verified itself
is assigned on it; where any rank could not (the root is local to the chief's node, its
copy differs, the model cannot be read in place), the chief sends its own verified arrays
to every rank, as the chief-only read (the default) does. Measured in
``benchmarks/bench_resume_ranks.py``: on one host, every rank reading took 0.56–0.82× of
the chief's read and broadcast at 2, 4 and 8 ranks. It is not the default because the
other ranks then read the checkpoint root, which the chief-only read never lets them
touch (a rank's host may lack the credentials, a bucket bills each read).

One step tried is, on every rank, in this order::

    broadcast ("read", info)             chief -> all
    allgather status                     "ok" | "corrupt" | "not in place" | "failed: ..."
    [broadcast arrays]                   only when a status is not "ok" and the chief's
                                         is not "corrupt": ("arrays", ...) or ("none",)

and the decision ends with the chief's ``("ok", result)`` or ``("error", type, text)``,
as :func:`~forge_dist.comm.agree` sends it, the weights left out of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forge_dist.comm.base import Communicator
from forge_dist.errors import ConfigurationError, ForgeDistError, IntegrityError

NAME = "restore_latest"
_YOURS = "(the weights this rank read)"  # stands for them in the decision sent round

Fetch = Callable[[Any, Any], tuple]  # (store, info) -> (weights, optimizer values)
Read = Callable[[Any, Any], "tuple | None"]  # in place, or None where it cannot be


def _status(read: Callable[[], tuple | None]) -> tuple[str, Any]:
    """``(status, arrays or the exception)`` of one rank's read."""
    try:
        got = read()
    except IntegrityError as e:
        return "corrupt", e
    except Exception as e:  # any rank's trouble makes the chief send its arrays
        return f"failed: {type(e).__name__}: {e}", e
    return ("ok", got) if got is not None else ("not in place", None)


class ChiefFetch:
    """On the chief: the ``fetch`` the decision calls for each step it tries."""

    def __init__(self, comm: Communicator, read: Read, fetch: Fetch) -> None:
        self.comm, self.read, self.fetch = comm, read, fetch

    def __call__(self, store: Any, info: Any) -> tuple:
        self.comm.broadcast(("read", info), name=NAME)
        status, got = _status(lambda: self.read(store, info))
        everyone = self.comm.allgather(status, name=f"{NAME}: read")
        if status == "corrupt":
            raise got  # the others drop theirs; the decision skips the step
        if all(s == "ok" for s in everyone):
            return got
        try:
            if status != "ok":
                got = self.fetch(store, info)  # downloaded, verified while copied
        except Exception:
            self.comm.broadcast(("none",), name=f"{NAME}: arrays")
            raise
        self.comm.broadcast(("arrays", got), name=f"{NAME}: arrays")
        return got


def lead(comm: Communicator, decide: Callable[[ChiefFetch], Any], chief_fetch: ChiefFetch) -> Any:
    """On the chief: run ``decide`` with ``chief_fetch``; every rank gets its result
    (its weights left out: each rank has its own) or its failure."""
    failure: BaseException | None = None
    try:
        result = decide(chief_fetch)
        payload: Any = ("ok", _without_weights(result))
    except Exception as e:  # every rank must hear of it
        failure, payload = e, ("error", type(e).__name__, str(e))
    comm.broadcast(payload, name=NAME)
    if failure is not None:
        raise failure
    return result


def follow(comm: Communicator, read: Callable[[Any], tuple | None]) -> Any:
    """On every other rank: read each step the chief tries, keep what verified (its
    own, else the chief's), and return the chief's decision with those weights."""
    mine: tuple | None = None
    while True:
        msg = comm.broadcast(None, name=NAME)
        if msg[0] != "read":
            break
        status, got = _status(lambda info=msg[1]: read(info))
        everyone = comm.allgather(status, name=f"{NAME}: read")
        if everyone[0] == "corrupt":
            continue
        if any(s != "ok" for s in everyone):
            sent = comm.broadcast(None, name=f"{NAME}: arrays")
            if sent[0] != "arrays":
                continue
            if status != "ok":
                got = sent[1]
        mine = got
    if msg[0] == "error":
        cls = ConfigurationError if msg[1] == "ConfigurationError" else ForgeDistError
        raise cls(f"{NAME} failed on rank 0: {msg[1]}: {msg[2]}")
    return _with_weights(msg[1], mine)


def _without_weights(result: Any) -> Any:
    """The decision with the restored step's weights and optimizer values (and any
    callback's copy of those same weights) replaced by a marker."""
    loaded, skipped, passed = result
    if not (isinstance(loaded, tuple) and len(loaded) == 7):
        return result
    step, state, weights, _opt, restored, run, where = loaded
    marked = {
        name: type(r)(r.state, _YOURS if r.weights is weights else r.weights)
        for name, r in restored.items()
    }
    return (step, state, _YOURS, _YOURS, marked, run, where), skipped, passed


def _with_weights(result: Any, mine: tuple | None) -> Any:
    loaded, skipped, passed = result
    if not (isinstance(loaded, tuple) and len(loaded) == 7):
        return result
    if mine is None:  # cannot happen: the step chosen was read, or sent, here
        raise ForgeDistError(f"{NAME}: this rank holds no weights of the restored step")
    step, state, _w, _o, restored, run, where = loaded
    weights, opt = mine
    kept = {
        name: type(r)(r.state, weights if isinstance(r.weights, str) else r.weights)
        for name, r in restored.items()
    }
    return (step, state, weights, opt, kept, run, where), skipped, passed
