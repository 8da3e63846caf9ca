"""``OnChief``: any Keras callback, run once (on the chief) with the synced logs."""

from __future__ import annotations

import logging
from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras._compat import Callback
from forge_dist.keras.callbacks.base import ForgeCallback

log = logging.getLogger("forge_dist.keras")

ON_ERROR = ("raise", "warn")


class OnChief(ForgeCallback):
    """Runs ``callback`` on the chief only, with the logs every rank agreed on.

    Put it after the metric sync and the decisions (``production_callbacks(extra=[...])``
    does): at an epoch end it sees the synced values, the learning rate just set and
    ``model.stop_training`` as decided, and it runs before a preemption that ends the
    epoch stops the job. Other ranks never call it, so an alert fires once, a file is
    written once. If it raises, the error is raised on every rank in the same call
    (``on_error="raise"``), or logged on the chief and training goes on (``"warn"``);
    never a hang. Batch hooks are forwarded only with ``batch_hooks=True``, and then
    agreed at every batch (one small broadcast a batch); they see the chief's own
    batch values.

    A callback that keeps state across resumes (an alert that fired once, a counter)
    says so with ``get_state() -> dict`` (JSON-able) and ``set_state(state)``: its state
    is then saved in every checkpoint and given back after a restore, after its own
    ``on_train_begin`` (``reset_state()``, if it has one, is called at a fresh start).
    """

    state_key = "on_chief"

    def __init__(
        self,
        callback: Any,
        on_error: str = "raise",
        batch_hooks: bool = False,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator)
        if not isinstance(callback, Callback):
            raise ConfigurationError(
                f"OnChief wraps a Keras callback, got {type(callback).__name__}"
            )
        if isinstance(callback, ForgeCallback):
            raise ConfigurationError(
                f"{type(callback).__name__} is a forge_dist callback: it already runs on "
                "every rank and agrees; pass it to fit directly"
            )
        if on_error not in ON_ERROR:
            raise ConfigurationError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.callback = callback
        self.on_error = on_error
        self.batch_hooks = bool(batch_hooks)
        self._in_fit = False
        self.name = type(callback).__name__

    def state_id(self) -> str:
        return f"{self.state_key}[{self.name}]"

    # -- the wrapped callback's own state, if it keeps one (get_state / set_state)
    def get_state(self) -> dict[str, Any] | None:
        get = getattr(self.callback, "get_state", None)
        return {"state": get()} if callable(get) and self.comm.is_chief else None

    def set_state(self, state: dict[str, Any], weights: list[Any] | None = None) -> None:
        put = getattr(self.callback, "set_state", None)
        if callable(put) and "state" in state:
            put(state["state"])

    def reset_state(self) -> None:
        reset = getattr(self.callback, "reset_state", None)
        if callable(reset):
            reset()

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        if self.comm.is_chief:
            self.callback.set_model(model)

    def set_params(self, params: Any) -> None:
        super().set_params(params)
        if self.comm.is_chief:
            self.callback.set_params(params)

    def _run(self, hook: str, *args: Any) -> None:
        """The wrapped callback's ``hook`` on the chief; its failure agreed by all."""

        def call() -> None:
            try:
                getattr(self.callback, hook)(*args)
            except Exception as e:
                if self.on_error == "raise":
                    raise
                log.warning("%s.%s failed on the chief (ignored): %s", self.name, hook, e)
                self._say(f"warning: {self.name}.{hook} failed: {type(e).__name__}: {e}")

        self._agree(f"OnChief({self.name}).{hook}", call)

    def train_begin(self, logs: Any = None) -> None:
        self._in_fit = True
        self._run("on_train_begin", logs)
        self.begin_state()  # after its own train begin, which may reset what it keeps

    def on_train_end(self, logs: Any = None) -> None:
        self._in_fit = False
        self._run("on_train_end", logs)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._run("on_epoch_begin", epoch, logs)

    def epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._run("on_epoch_end", epoch, logs)

    def on_test_end(self, logs: Any = None) -> None:
        if not self._in_fit:  # inside fit, the epoch end brings the synced val_* values
            self._run("on_test_end", logs)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.batch_hooks:
            self._run("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.batch_hooks:
            self._run("on_train_batch_end", batch, logs)
