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


def metric_names(model: Any) -> list[str]:
    """Each metric variable's name (Keras 3: its path, ``compile_metrics/accuracy/total``;
    tf_keras: ``metric/variable``), in the order of :func:`metric_values`."""
    return [
        getattr(v, "path", None) or f"{m.name}/{v.name.split(':')[0]}"
        for m in getattr(model, "metrics", []) or []
        for v in m.variables
    ]


def metric_values(model: Any) -> list[list[float]]:
    """This rank's metric variables, each flattened to floats (JSON-able)."""
    return [np.ravel(_compat.to_numpy(v)).astype(float).tolist() for v in metric_variables(model)]


def saved_state(ranks: list[list[list[float]]], names: list[str] | None = None) -> dict[str, Any]:
    """What a mid-epoch checkpoint stores: every rank's values, in rank order, and which
    metric variable each is."""
    out: dict[str, Any] = {"world_size": len(ranks), "ranks": ranks}
    if names is not None:
        out["names"] = names
    return out


def build_metrics(model: Any, x: Any, y: Any, sample_weight: Any = None) -> None:
    """Keras creates a compiled metric's variables (``accuracy``'s total and count, an
    ``AUC``'s confusion counts) at the first training step: a new process that resumes
    mid-epoch has none yet to put the saved totals into. Build them now, on one sample
    the fit will train on (a prediction and a metric update, then every metric reset:
    the weights and the optimizer are not touched)."""
    import contextlib

    strategy = getattr(model, "distribute_strategy", None)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        y_pred = model(x, training=False)
        model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        for m in getattr(model, "metrics", []) or []:
            m.reset_state()


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


def mismatch(model: Any, values: list[list[float]], names: list[str] | None) -> str | None:
    """Why the saved values cannot go into this model's metric variables, or None."""
    variables = metric_variables(model)
    now = metric_names(model)
    if names is not None and names != now:
        gone = [n for n in names if n not in now]
        new = [n for n in now if n not in names]
        return (
            f"the compiled metrics differ from the checkpoint's (saved only: {gone or 'none'}; "
            f"now only: {new or 'none'})"
        )
    if len(variables) != len(values):
        return f"{len(values)} metric variables were saved, the model has {len(variables)}"
    for var, vals in zip(variables, values, strict=True):
        if int(np.prod(tuple(var.shape))) != len(vals):
            return f"metric variable {var.name} holds {len(vals)} values in the checkpoint"
    return None


class RestoreMetricState(_compat.Callback):
    """Puts ``values`` into the metric variables when the first epoch begins (after
    Keras has reset them)."""

    def __init__(self, values: list[list[float]], names: list[str] | None = None) -> None:
        super().__init__()
        self.values: list[list[float]] | None = values
        self.names = names

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.values is None:
            return
        why = mismatch(self.model, self.values, self.names)
        if why is not None:
            log.warning(
                "%s: the interrupted epoch's training metrics will cover only the batches "
                "after the resume (its loss and metrics, and decisions on them, differ from "
                "an uninterrupted run's)",
                why,
            )
            print(
                f"[forge_dist] warning: {why}: the interrupted epoch's training metrics "
                "cover only the batches after the resume",
                flush=True,
            )
        else:
            for var, vals in zip(metric_variables(self.model), self.values, strict=True):
                dtype = np.dtype(getattr(var.dtype, "name", var.dtype))
                var.assign(np.asarray(vals, dtype=dtype).reshape(tuple(var.shape)))
        self.values = None
