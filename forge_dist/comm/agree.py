"""One decision, taken on the chief and applied on every rank.

Lightning's rule, "reduce what comes from metrics, broadcast what comes from local
facts": a decision that reads files, clocks or the chief's state is computed once and
broadcast, and so is its failure, so that no rank returns early from a collective that
the others still wait in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from forge_dist.comm.base import Communicator
from forge_dist.errors import ConfigurationError, ForgeDistError

T = TypeVar("T")


def agree(comm: Communicator, name: str, decide: Callable[[], T]) -> T:
    """Run ``decide`` on the chief and return its result on every rank. If it raises,
    the chief re-raises its own exception and every other rank raises a
    :class:`~forge_dist.errors.ForgeDistError` (a ``ConfigurationError`` for one) that
    names it, in the same call."""
    payload: Any = None
    failure: BaseException | None = None
    if comm.is_chief:
        try:
            payload = ("ok", decide())
        except Exception as e:  # every rank must hear of it, not just the chief
            failure = e
            payload = ("error", type(e).__name__, str(e))
    payload = comm.broadcast(payload, name=name)
    if payload[0] == "error":
        if failure is not None:
            raise failure
        cls = ConfigurationError if payload[1] == "ConfigurationError" else ForgeDistError
        raise cls(f"{name} failed on rank 0: {payload[1]}: {payload[2]}")
    return payload[1]
