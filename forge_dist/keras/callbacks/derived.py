"""``DerivedMetric``: a monitor computed from the synced logs, the same on every rank."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras._state import registry
from forge_dist.keras.callbacks.base import ForgeCallback

log = logging.getLogger("forge_dist.keras")

DIRECTIONS = {"max": "up", "min": "down"}


class DerivedMetric(ForgeCallback):
    """``logs[name] = fn(logs)`` at every epoch end, on every rank.

    Wherever it stands in the list, it is computed right after the epoch's logs are
    synced, before any forge_dist callback sees them: ``fn`` sees the values every rank
    agreed on, so every rank computes the same number and takes the same decision.
    ``mode`` ("min" or "max") tells ``mode="auto"`` callbacks which way is better.
    For example, stop when neither ``val_accuracy`` nor ``val_f1`` gets better::

        fk.DerivedMetric("val_acc_f1", lambda logs: max(logs["val_accuracy"], logs["val_f1"]),
                         mode="max")

    (its best only moves when one of the two passes the best of both so far).
    """

    state_key = "derived"

    def __init__(
        self,
        name: str,
        fn: Callable[[dict[str, Any]], float],
        mode: str,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator)
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a metric name, got {name!r}")
        if not callable(fn):
            raise ConfigurationError("fn must be a callable taking the logs dict")
        if mode not in DIRECTIONS:
            raise ConfigurationError(f"mode must be 'min' or 'max', got {mode!r}")
        self.name, self.fn, self.mode = name, fn, mode

    def state_id(self) -> str:
        return f"{self.state_key}[{self.name}]"

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        registry(model).directions[self.name] = DIRECTIONS[self.mode]

    def derive(self, epoch: int, logs: Any = None) -> None:
        if logs is None:
            return
        try:
            value = float(self.fn(dict(logs)))
        except Exception as e:  # the same logs on every rank: the same error everywhere
            raise ConfigurationError(
                f"DerivedMetric({self.name!r}) failed at epoch {epoch + 1}: "
                f"{type(e).__name__}: {e} (logs: {', '.join(sorted(logs))})"
            ) from e
        if math.isnan(value):
            log.warning("DerivedMetric(%r) is NaN at epoch %d", self.name, epoch + 1)
        logs[self.name] = value
