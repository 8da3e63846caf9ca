"""``ConsistencyGuard``: a check that every rank still holds the same weights."""

from __future__ import annotations

import logging
from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import CollectiveMismatchError, ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras.callbacks.base import ForgeCallback, check_positive_int
from forge_dist.keras.callbacks.broadcast import broadcast_model_state

log = logging.getLogger("forge_dist.keras")

ON_MISMATCH = ("raise", "warn", "repair")


def likely_causes(model: Any, comm: Communicator) -> str:
    """What usually makes ranks' weights part, most likely first."""
    causes = []
    optimizer = getattr(model, "optimizer", None)
    averaged = comm.averages_gradients or _compat.averages_gradients(optimizer)
    if optimizer is not None and not averaged:
        causes.append(
            "the optimizer does not average gradients across ranks (each rank trains "
            "its own model): wrap it, forge_dist.keras.DistributedOptimizer(optimizer)"
        )
    causes.append(
        "the ranks started from different weights: seed every rank alike "
        "(keras.utils.set_random_seed) or put forge_dist.keras.BroadcastInitialState() first"
    )
    causes.append("a layer that behaves differently per rank (its own random seed)")
    return "Likely causes: " + "; ".join(f"({i + 1}) {c}" for i, c in enumerate(causes))


class ConsistencyGuard(ForgeCallback):
    """Compares a fingerprint of every rank's weights every ``every_n_epochs`` epochs.

    ``on_mismatch``: ``"raise"`` (an error on every rank), ``"warn"``, or ``"repair"``
    (every rank takes the chief's weights)."""

    state_key = "guard"

    def __init__(
        self,
        every_n_epochs: int = 1,
        on_mismatch: str = "raise",
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator)
        check_positive_int("every_n_epochs", every_n_epochs)
        if on_mismatch not in ON_MISMATCH:
            raise ConfigurationError(
                f"on_mismatch must be 'raise', 'warn' or 'repair', got {on_mismatch!r}"
            )
        self.every_n_epochs = every_n_epochs
        self.on_mismatch = on_mismatch
        self.fingerprints: list[str] = []
        self.mismatches = 0

    def epoch_end(self, epoch: int, logs: Any = None) -> None:
        if (epoch + 1) % self.every_n_epochs:
            return
        mine = _compat.weights_fingerprint(self.model.get_weights())
        prints = self.comm.allgather(mine, name=f"ConsistencyGuard(epoch {epoch})")
        self.fingerprints.append(prints[0])
        differing = [r for r, p in enumerate(prints) if p != prints[0]]
        if not differing:
            return
        self.mismatches += 1
        msg = (
            f"epoch {epoch + 1}: weights differ from rank 0 on rank(s) "
            f"{', '.join(map(str, differing))} (a silent desync). "
            + likely_causes(self.model, self.comm)
        )
        if self.on_mismatch == "raise":
            raise CollectiveMismatchError(msg)
        if self.on_mismatch == "warn":
            log.warning(msg)
            return
        broadcast_model_state(self.model, self.comm, 0, f"ConsistencyGuard(repair epoch {epoch})")
        log.warning("%s; repaired from rank 0", msg)
