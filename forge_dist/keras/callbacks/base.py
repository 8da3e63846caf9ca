"""What every forge_dist callback shares: its communicator, its registered name and
state (the protocol in :mod:`forge_dist.keras._state`), agreeing on a decision, and
printing on the chief only."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from forge_dist import policy
from forge_dist.comm import Communicator, agree, get_communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras._compat import Callback
from forge_dist.keras._state import register, registry, take_pending
from forge_dist.keras.in_graph import watch_train_function

log = logging.getLogger("forge_dist.keras")
T = TypeVar("T")


def resolve_comm(communicator: Communicator | None) -> Communicator:
    """``communicator``, or the process-wide one."""
    return communicator if communicator is not None else get_communicator("auto")


def check_keras_supports(comm: Communicator) -> None:
    """Keras 3 does not train under MultiWorkerMirroredStrategy: say so at construction,
    on every worker, instead of failing deep inside fit."""
    if comm.multi_worker and _compat.FLAVOR == "keras3":
        raise ConfigurationError(
            "Keras 3 does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585: "
            "model.fit fails converting PerReplica values). Set TF_USE_LEGACY_KERAS=1 to use "
            "tf_keras, or launch with Horovod (scripts/launch_horovod.sh)."
        )


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ConfigurationError(f"{name} must be a positive int{extra}, got {value!r}")


def keras_alias(name: str, value: Any, keras_name: str, keras_value: Any) -> Any:
    """``value``, or Keras' name for the same argument (``filepath``, ``filename``)."""
    if keras_value is None:
        if value is None:
            raise ConfigurationError(f"{name} (Keras' {keras_name}) is required")
        return value
    if value is not None and value != keras_value:
        raise ConfigurationError(f"pass {name} or {keras_name} (the same thing), not both")
    return keras_value


def missing_monitor(monitor: str, logs: dict[str, Any], who: str) -> ConfigurationError:
    keys = ", ".join(sorted(logs)) or "none"
    return ConfigurationError(
        f"{who}: monitor {monitor!r} is not in the logs (available: {keys}); "
        "check the metric name, and that validation data is passed to fit"
    )


class ForgeCallback(Callback):
    """Shared plumbing: communicator, registration, state, printing on the chief only.

    Subclasses that keep state override :meth:`get_state`, :meth:`set_state` and
    :meth:`reset_state`, and call :meth:`begin_state` in ``on_train_begin``.
    """

    #: The name this callback's state is stored under (made unique per model).
    state_key = "callback"
    #: Decides from the synced logs and its own state alone (no file, clock or chief
    #: fact): every rank can take the decision itself (see :meth:`_decide`).
    decides_locally = False

    def __init__(self, communicator: Communicator | None = None, verbose: int = 0) -> None:
        super().__init__()
        self.comm = resolve_comm(communicator)
        check_keras_supports(self.comm)
        self.verbose = verbose
        self.state_name = self.state_key

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self.state_name = register(model, self)
        watch_train_function(model, self.comm)

    # -- the state protocol
    def get_state(self) -> dict[str, Any] | None:
        """This callback's state as JSON-able data, or None when it keeps none."""
        return None

    def set_state(self, state: dict[str, Any], weights: list[Any] | None = None) -> None:
        """Take back a state that :meth:`get_state` returned (from a checkpoint)."""

    def reset_state(self) -> None:
        """Start afresh (a new fit with nothing restored)."""

    def decision_inputs(self) -> Any:
        """What this callback's decisions read besides the synced logs (compared across
        ranks for those that decide locally)."""
        return self.get_state()

    def on_preemption(self) -> None:
        """Called on every rank just before a preemption save (then the job stops)."""

    def begin_state(self) -> None:
        """At train begin: keep the state when this fit continues the previous one
        (:func:`~forge_dist.keras.fit_resumed`), else take the restored one, else reset."""
        if registry(self.model).keep_state:
            return
        restored = take_pending(self.model, self.state_name)
        if restored is None:
            self.reset_state()
        else:
            self.set_state(restored.state, restored.weights)

    # -- agreeing and telling
    def _decide(self, epoch: int, name: str, decide: Callable[[], T]) -> T:
        """A decision from this epoch's synced logs and this callback's state.

        Where :class:`SyncMetrics` synced this epoch's logs and, in the same collective,
        found every rank's deciding state equal (:func:`~forge_dist.keras._state.
        deciding_digest`), the inputs are bit-identical on every rank and ``decide`` is
        pure, so every rank takes it itself: no collective (an error is raised alike on
        every rank). Otherwise the chief decides and broadcasts (:meth:`_agree`)."""
        if registry(self.model).synced_epoch == epoch:
            return decide()
        return self._agree(name, decide)

    def _agree(self, name: str, decide: Callable[[], T]) -> T:
        """``decide`` on the chief; its result, or its error, on every rank."""
        return agree(self.comm, name, decide)

    def _say(self, message: str) -> None:
        log.info(message)
        if self.verbose and self.comm.is_chief:
            # Keras' progress bar (verbose=1) leaves its line open on a terminal.
            bar = (self.params or {}).get("verbose") == 1 and sys.stdout.isatty()
            lead = "\n" if bar else ""
            print(f"{lead}[forge_dist] {message}", flush=True)

    # -- monitor and mode
    def _setup_monitor(self, monitor: str, mode: str) -> str | None:
        """Check ``monitor``/``mode`` now; return the mode if the name decides it (else
        it is resolved from the model's metrics in ``on_train_begin``)."""
        policy.check_monitor(monitor)
        if mode not in ("auto", "min", "max"):
            raise ConfigurationError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        try:
            resolved: str | None = policy.resolve_mode(monitor, mode)
        except ConfigurationError:
            resolved = None
        self._mode_resolved = resolved is not None
        return resolved

    def _resolve_mode(self, monitor: str, mode: str) -> str:
        direction = None
        if mode == "auto":
            direction = registry(self.model).directions.get(monitor) or _compat.metric_direction(
                self.model, monitor
            )
        return policy.resolve_mode(monitor, mode, direction)

    def _finish_mode(self) -> None:
        """Resolve ``mode="auto"`` from the model's metrics into ``self.config``."""
        if not self._mode_resolved:
            mode = self._resolve_mode(self.monitor, self.mode)
            self.config = dataclasses.replace(self.config, mode=mode)
            self._mode_resolved = True
        self._check_mode_direction()

    def _check_mode_direction(self) -> None:
        """A ``mode`` that contradicts the metric's known direction (``mode="min"`` for
        ``val_accuracy``) is a warning on the chief: the decisions would keep the worst."""
        if self.mode == "auto":
            return
        try:
            natural = self._resolve_mode(self.monitor, "auto")
        except ConfigurationError:
            return
        if natural != self.mode and self.comm.is_chief:
            message = (
                f"warning: {type(self).__name__}(monitor={self.monitor!r}, mode={self.mode!r}): "
                f"{self.monitor!r} is normally {'maximised' if natural == 'max' else 'minimised'}"
                f"; with mode={self.mode!r} the worst values count as best (mode='auto' "
                "follows the metric)"
            )
            log.warning(message)
            print(f"[forge_dist] {message}", flush=True)


class PolicyState:
    """For callbacks whose state is a :mod:`forge_dist.policy` state (``self.state``)
    under a config (``self.config``): Keras' read-only views and the stored form."""

    state: Any
    config: Any

    @property
    def wait(self) -> int:
        return int(self.state.wait)

    @property
    def best(self) -> float | None:
        return self.state.best  # type: ignore[no-any-return]

    def get_state(self) -> dict[str, Any]:
        return {"mode": self.config.mode, **self.state.to_json()}

    def decision_inputs(self) -> Any:
        """The config and the state: what a decision reads besides the synced logs."""
        return [repr(self.config), self.get_state()]
