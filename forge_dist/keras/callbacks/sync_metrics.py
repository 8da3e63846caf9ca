"""``SyncMetrics``: every rank's logs replaced by the mean across ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forge_dist import policy
from forge_dist.comm import Communicator
from forge_dist.errors import CollectiveMismatchError, ConfigurationError
from forge_dist.keras._compat import to_float
from forge_dist.keras._state import deciding_digest, registry
from forge_dist.keras.callbacks.base import ForgeCallback


class SyncMetrics(ForgeCallback):
    """Replaces every numeric value in ``logs`` by its mean across ranks.

    Validation values (``val_*``, and everything in ``evaluate``) are weighted by each
    rank's number of validation samples when ``validation_samples`` is given (an int or a
    callable returning one). Keys are reduced in sorted order; a rank with a different
    set of keys is an error on every rank. Put it first: :func:`production_callbacks`
    does.
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

    def _weight(self) -> float | None:
        v = self.validation_samples
        if v is None:
            return None
        return float(v() if callable(v) else v)

    def on_train_begin(self, logs: Any = None) -> None:
        self._in_fit = True
        registry(self.model).synced_epoch = None

    def on_train_end(self, logs: Any = None) -> None:
        self._in_fit = False

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        reg = registry(self.model)
        reg.synced_epoch = None
        if logs is not None:
            # With the metrics, each rank's deciding state: equal everywhere, the
            # decisions that follow are taken on every rank without another collective.
            sync_logs(
                self.comm,
                logs,
                f"SyncMetrics(epoch {epoch})",
                self._weight(),
                weight_all=False,
                check=deciding_digest(self.model),
            )
            reg.synced_epoch = epoch

    def on_test_end(self, logs: Any = None) -> None:
        if logs is not None and not self._in_fit:
            self.sync(logs, "SyncMetrics(evaluate)", weight_all=True)

    def sync(self, logs: dict[str, Any], name: str, weight_all: bool) -> None:
        """Replace ``logs``' numbers by their means across ranks, in place."""
        sync_logs(self.comm, logs, name, self._weight(), weight_all)


def sync_logs(
    comm: Communicator,
    logs: dict[str, Any],
    name: str,
    weight: float | None = None,
    weight_all: bool = False,
    check: str | None = None,
) -> None:
    """Replace every number in ``logs`` by its mean across ranks, in place (every rank
    calls it; keys in sorted order). ``val_*`` values, or all with ``weight_all``, are
    weighted by each rank's ``weight`` when every rank gave one. ``check`` (a digest of
    the state decisions are taken from) must be equal on every rank, else every rank
    raises."""
    numeric = {k: f for k in sorted(logs) if (f := to_float(logs[k])) is not None}
    keys = tuple(numeric)
    rows = comm.allgather((keys, [numeric[k] for k in keys], weight, check), name=name)
    checks = [row[3] for row in rows]
    if len(set(checks)) > 1:
        bad = [r for r, c in enumerate(checks) if c != checks[0]]
        raise CollectiveMismatchError(
            f"{name}: the early-stopping / learning-rate state of rank(s) "
            f"{', '.join(map(str, bad))} differs from rank 0's, so the ranks would decide "
            "differently (were the callbacks built with other arguments, or restored from "
            "other checkpoints, on some ranks?)"
        )
    key_sets = {r: row[0] for r, row in enumerate(rows)}
    if len(set(key_sets.values())) > 1:
        ref = key_sets[0]
        diffs = [f"rank {r}: {sorted(set(k) ^ set(ref))}" for r, k in key_sets.items() if k != ref]
        raise CollectiveMismatchError(
            f"{name}: ranks logged different metrics (differences from rank 0: "
            + "; ".join(diffs)
            + ")"
        )
    plain, weighted = policy.mean_over_ranks([row[1] for row in rows], [r[2] for r in rows])
    for i, k in enumerate(keys):
        use_weight = weight_all or k.startswith("val_")
        logs[k] = weighted[i] if use_weight else plain[i]
