"""Giving every rank the chief's model state: ``BroadcastInitialState`` at train begin,
and the helpers the guard's repair and the restore use."""

from __future__ import annotations

from typing import Any

import numpy as np

from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras.callbacks.base import ForgeCallback


def optimizer_values(model: Any) -> list[Any]:
    """The optimizer's variables as NumPy arrays (none without an optimizer)."""
    if model.optimizer is None:
        return []
    return [_compat.to_numpy(v) for v in _compat.optimizer_variables(model.optimizer)]


def broadcast_model_state(model: Any, comm: Communicator, root: int = 0, name: str = "") -> None:
    """Give every rank ``root``'s weights and optimizer variables."""
    if not model.built or not model.weights:
        raise ConfigurationError(
            "the model has no weights yet: build it (e.g. with keras.Input or model.build) "
            "before training, so the chief's initial weights can be broadcast"
        )
    if model.optimizer is not None:
        _compat.ensure_optimizer_built(model)
    payload = (model.get_weights(), optimizer_values(model)) if comm.rank == root else None
    weights, opt_values = comm.broadcast(payload, root=root, name=name or "broadcast_model_state")
    if comm.rank != root:
        model.set_weights(weights)
        if model.optimizer is not None:
            assign_optimizer_variables(model, opt_values)


def assign_optimizer_variables(model: Any, values: list[Any]) -> None:
    variables = _compat.optimizer_variables(model.optimizer)
    if len(variables) != len(values):
        raise ConfigurationError(
            f"optimizer has {len(variables)} variables but {len(values)} were received: "
            "is every rank building the same model and optimizer?"
        )
    for var, value in zip(variables, values, strict=True):
        var.assign(np.asarray(value).reshape(tuple(var.shape)))


class BroadcastInitialState(ForgeCallback):
    """At train begin every rank gets the chief's (``root``'s) model and optimizer
    variables: the replacement for Horovod's ``BroadcastGlobalVariablesCallback``,
    which is broken on Keras 3."""

    state_key = "broadcast"

    def __init__(self, root: int = 0, communicator: Communicator | None = None) -> None:
        super().__init__(communicator)
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.comm.size:
            raise ConfigurationError(f"root must be a rank in [0, {self.comm.size}), got {root!r}")
        self.root = root

    def train_begin(self, logs: Any = None) -> None:
        if self.comm.size > 1 and not self.comm.shares_initial_state:
            broadcast_model_state(self.model, self.comm, self.root, "BroadcastInitialState")
