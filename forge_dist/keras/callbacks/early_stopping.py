"""``SyncEarlyStopping``: Keras' ``EarlyStopping``, decided once for every rank."""

from __future__ import annotations

import dataclasses
from typing import Any

from forge_dist import policy
from forge_dist.comm import Communicator
from forge_dist.keras._state import WEIGHTS_OF_EPOCH, registry
from forge_dist.keras.callbacks.base import ForgeCallback, PolicyState, monitor_value


class SyncEarlyStopping(PolicyState, ForgeCallback):
    """Keras' ``EarlyStopping``, decided once and applied on every rank in the same epoch.

    With ``restore_best_weights=True`` every rank ends with the chief's best weights.
    """

    state_key = "early_stopping"
    decides_locally = True

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator, verbose)
        resolved = self._setup_monitor(monitor, mode)
        # Validates every number now, on every rank; the mode may wait for the model.
        self.config = policy.EarlyStopConfig(
            monitor=monitor,
            mode=resolved or "min",
            min_delta=min_delta,
            patience=patience,
            baseline=baseline,
            start_from_epoch=start_from_epoch,
            restore_best_weights=bool(restore_best_weights),
        )
        self.state = policy.EarlyStopState()
        self.best_weights: list[Any] | None = None
        self.restore_best_weights = restore_best_weights

    @property
    def patience(self) -> int:
        return self.config.patience

    @patience.setter
    def patience(self, value: int) -> None:
        self.config = dataclasses.replace(self.config, patience=value)

    # Keras' attributes (and wait, best), read and set as on Keras' EarlyStopping
    @property
    def stopped_epoch(self) -> int:
        return self.state.stopped_epoch

    @stopped_epoch.setter
    def stopped_epoch(self, value: int) -> None:
        self._set(stopped_epoch=int(value))

    @property
    def best_epoch(self) -> int:
        return self.state.best_epoch

    @best_epoch.setter
    def best_epoch(self, value: int) -> None:
        self._set(best_epoch=int(value))

    @property
    def baseline(self) -> float | None:
        return self.config.baseline

    @property
    def start_from_epoch(self) -> int:
        return self.config.start_from_epoch

    @property
    def min_delta(self) -> float:
        return self.config.min_delta

    # -- the state protocol
    def state_id(self) -> str:
        return f"{self.state_key}[{self.monitor}]"

    def get_state(self) -> dict[str, Any]:
        best_weights = self.state.best_epoch if self.state.has_best_weights else None
        return {**super().get_state(), WEIGHTS_OF_EPOCH: best_weights}

    def set_state(self, state: dict[str, Any], weights: list[Any] | None = None) -> None:
        self.state = policy.EarlyStopState.from_json(state)
        self.best_weights = weights if self.state.has_best_weights else None
        if self.state.has_best_weights and weights is None:
            # No intact checkpoint of the best epoch: the best seen after resuming wins.
            self.state = dataclasses.replace(self.state, has_best_weights=False)

    def reset_state(self) -> None:
        self.state = policy.EarlyStopState()
        self.best_weights = None

    # -- Keras hooks
    def train_begin(self, logs: Any = None) -> None:
        self._finish_mode()
        self.begin_state()

    def epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs = logs or {}
        self._finish_mode(final=True)

        def decide() -> policy.EarlyStopDecision:
            current = None
            if epoch >= self.config.start_from_epoch:  # (None: no validation this epoch)
                current = monitor_value(logs, self.monitor, "SyncEarlyStopping")
            return policy.early_stop_step(self.config, self.state, epoch, current)

        decision = self._decide(epoch, f"SyncEarlyStopping(epoch {epoch})", decide)
        self.state = decision.state
        # Where reading variables needs every rank (MWMS), every rank takes the snapshot.
        if decision.snapshot_weights and (self.comm.is_chief or self.comm.collective_saves):
            self.best_weights = self.model.get_weights()
        if decision.stop:
            self.model.stop_training = True
        if decision.message and self.verbose > 1:
            self._say(decision.message)

    def on_train_end(self, logs: Any = None) -> None:
        if registry(self.model).partial_fit and not self.model.stop_training:
            return  # fit_resumed: training goes on in the next fit
        if self.state.stopped_epoch > 0:
            self._say_as_keras(f"Epoch {self.state.stopped_epoch + 1}: early stopping")
        if self.config.restore_best_weights and self.state.has_best_weights:
            weights = self.comm.broadcast(
                self.best_weights if self.comm.is_chief else None,
                name="SyncEarlyStopping(restore_best_weights)",
            )
            if weights is not None:
                self._say_as_keras(
                    "Restoring model weights from the end of the best epoch: "
                    f"{self.state.best_epoch + 1}."
                )
                self.model.set_weights(weights)
