"""The running state of the training metrics inside an epoch (Keras' loss tracker and
compiled metrics: totals and counts), saved with a mid-epoch checkpoint and put back
when the interrupted epoch resumes, so its epoch-level values, and every decision taken
on them, equal an uninterrupted run's."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from forge_dist.keras import _compat

log = logging.getLogger("forge_dist.keras")


def metric_variables(model: Any) -> list[Any]:
    return [v for m in getattr(model, "metrics", []) or [] for v in m.variables]


def metric_values(model: Any) -> list[list[float]]:
    """This rank's metric variables, each flattened to floats (JSON-able)."""
    return [np.ravel(_compat.to_numpy(v)).astype(float).tolist() for v in metric_variables(model)]


def saved_state(ranks: list[list[list[float]]]) -> dict[str, Any]:
    """What a mid-epoch checkpoint stores: every rank's values, in rank order."""
    return {"world_size": len(ranks), "ranks": ranks}


def values_for(state: Any, rank: int, size: int) -> list[list[float]] | None:
    """This rank's saved values, or None (none saved).

    Saved by another world size (a resume with ``fit_resumed(shard=True)`` on a
    different number of ranks), every variable is summed over the saved ranks and
    shared evenly among this job's: Keras' means, sums and confusion counts keep sums
    and counts, so the interrupted epoch's totals carry over whole, and with equal step
    counts per rank the mean across ranks of each rank's epoch value is the whole
    epoch's."""
    if not isinstance(state, dict) or "ranks" not in state:
        return None
    ranks = state["ranks"]
    if state.get("world_size") == size:
        return ranks[rank]
    if not ranks:
        return None
    log.info(
        "the interrupted epoch's metric totals of %s ranks are shared among %s",
        len(ranks),
        size,
    )
    return [
        (np.sum([np.asarray(r[i], dtype=float) for r in ranks], axis=0) / size).tolist()
        for i in range(len(ranks[0]))
    ]


class RestoreMetricState(_compat.Callback):
    """Puts ``values`` into the metric variables when the first epoch begins (after
    Keras has reset them)."""

    def __init__(self, values: list[list[float]]) -> None:
        super().__init__()
        self.values: list[list[float]] | None = values

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.values is None:
            return
        variables = metric_variables(self.model)
        if len(variables) != len(self.values):
            log.warning("the model's metrics changed since the checkpoint: not restored")
        else:
            for var, vals in zip(variables, self.values, strict=True):
                dtype = np.dtype(getattr(var.dtype, "name", var.dtype))
                var.assign(np.asarray(vals, dtype=dtype).reshape(tuple(var.shape)))
        self.values = None
