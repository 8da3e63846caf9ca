"""``SyncReduceLROnPlateau``: Keras' ``ReduceLROnPlateau``, one learning rate for all."""

from __future__ import annotations

from typing import Any

from forge_dist import policy
from forge_dist.comm import Communicator
from forge_dist.errors import LearningRateNotSettable
from forge_dist.keras import _compat
from forge_dist.keras.callbacks.base import ForgeCallback, PolicyState, monitor_value


class SyncReduceLROnPlateau(PolicyState, ForgeCallback):
    """Keras' ``ReduceLROnPlateau``; every rank holds the same learning rate after every
    epoch (the chief's), and ``logs["learning_rate"]`` shows it."""

    state_key = "reduce_lr"
    decides_locally = True

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator, verbose)
        resolved = self._setup_monitor(monitor, mode)
        self.config = policy.PlateauConfig(
            monitor=monitor,
            mode=resolved or "min",
            factor=factor,
            patience=patience,
            min_delta=min_delta,
            cooldown=cooldown,
            min_lr=min_lr,
        )
        self.state = policy.PlateauState()

    @property
    def cooldown_counter(self) -> int:
        return self.state.cooldown_counter

    @cooldown_counter.setter
    def cooldown_counter(self, value: int) -> None:
        self._set(cooldown_counter=int(value))

    def in_cooldown(self) -> bool:
        return self.state.cooldown_counter > 0

    # -- the state protocol (get_state from PolicyState)
    def state_id(self) -> str:
        return f"{self.state_key}[{self.monitor}]"

    def set_state(self, state: dict[str, Any], weights: list[Any] | None = None) -> None:
        self.state = policy.PlateauState.from_json(state)

    def reset_state(self) -> None:
        self.state = policy.PlateauState()

    def decision_inputs(self) -> Any:
        """Config, state and the learning rate: its decision compares the rate with
        ``min_lr``, so ranks holding different rates would decide differently."""
        return [*super().decision_inputs(), float(_compat.get_lr(self.model.optimizer))]

    # -- Keras hooks
    def train_begin(self, logs: Any = None) -> None:
        self._finish_mode()
        optimizer = self.model.optimizer
        _compat.get_lr(optimizer)  # fails early, on every rank, without one
        if _compat.has_lr_schedule(optimizer):  # Keras' TypeError, before the first step
            raise LearningRateNotSettable(
                "This optimizer was created with a `LearningRateSchedule` object as its "
                "`learning_rate` constructor argument, hence its learning rate is not "
                "settable: SyncReduceLROnPlateau cannot reduce it. Create the optimizer "
                "with a float `learning_rate`, or leave the plateau callback out."
            )
        self.begin_state()

    def epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs = logs if logs is not None else {}
        self._finish_mode(final=True)

        def decide() -> tuple[policy.PlateauDecision, float]:
            current = monitor_value(logs, self.monitor, "SyncReduceLROnPlateau")
            lr = _compat.get_lr(self.model.optimizer)
            return policy.plateau_step(self.config, self.state, epoch, current, lr), lr

        decision, chief_lr = self._decide(epoch, f"SyncReduceLROnPlateau(epoch {epoch})", decide)
        self.state = decision.state
        lr = decision.new_lr if decision.new_lr is not None else chief_lr
        if _compat.get_lr(self.model.optimizer) != lr:
            _compat.set_lr(self.model.optimizer, lr)
        logs["learning_rate"] = float(_compat.get_lr(self.model.optimizer))
        if decision.new_lr is not None:
            self._say_as_keras(
                f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to "
                f"{decision.new_lr}."
            )
        elif decision.message and self.verbose > 1:
            self._say(decision.message)
