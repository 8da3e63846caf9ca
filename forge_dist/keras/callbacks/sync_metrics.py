"""``SyncMetrics``: how validation values are weighted, and ``evaluate``'s logs synced.

Every forge_dist callback syncs an epoch's logs (the first of a fit to see them, see
:mod:`forge_dist.keras.fit`); this one says how ``val_*`` values are weighted, and syncs
the logs of ``model.evaluate`` too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras.callbacks.base import ForgeCallback
from forge_dist.keras.fit import sync_logs

__all__ = ["SyncMetrics", "sync_logs"]


class SyncMetrics(ForgeCallback):
    """Every numeric value in ``logs`` replaced by its mean across ranks.

    Any forge_dist callback in a fit already syncs the epoch's logs before the first of
    them sees them, wherever each stands in the list; put this one first to have the
    values synced for the plain Keras callbacks of the list too (``History``, the
    progress bar and your own come after it then). Validation values (``val_*``, and
    everything in ``evaluate``) are weighted by each rank's number of validation samples
    when ``validation_samples`` is given (an int or a callable returning one), else each
    rank counts alike. Keys are reduced in sorted order; a rank with a different set of
    keys is an error on every rank.
    """

    state_key = "sync_metrics"

    def __init__(
        self,
        communicator: Communicator | None = None,
        validation_samples: int | Callable[[], int] | None = None,
    ) -> None:
        super().__init__(communicator)
        if validation_samples is not None and not callable(validation_samples):
            if isinstance(validation_samples, bool) or not isinstance(validation_samples, int):
                raise ConfigurationError("validation_samples must be an int, a callable or None")
            if validation_samples < 0:
                raise ConfigurationError("validation_samples must be >= 0")
        self.validation_samples = validation_samples
        self._in_fit = False

    def validation_weight(self) -> float | None:
        v = self.validation_samples
        if v is None:
            return None
        return float(v() if callable(v) else v)

    def train_begin(self, logs: Any = None) -> None:
        self._in_fit = True

    def on_train_end(self, logs: Any = None) -> None:
        self._in_fit = False

    def on_test_end(self, logs: Any = None) -> None:
        if logs is not None and not self._in_fit:
            self.sync(logs, "SyncMetrics(evaluate)", weight_all=True)

    def sync(self, logs: dict[str, Any], name: str, weight_all: bool) -> None:
        """Replace ``logs``' numbers by their means across ranks, in place."""
        sync_logs(self.comm, logs, name, self.validation_weight(), weight_all)
