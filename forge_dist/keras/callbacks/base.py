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
from forge_dist.keras import fit as fitmod
from forge_dist.keras._compat import Callback, to_float
from forge_dist.keras._state import deciding_digest, register, registered, registry, take_pending
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


def is_save_freq(value: Any) -> bool:
    """Keras' ``save_freq``: ``"epoch"`` or a positive number of batches."""
    if value == "epoch":
        return True
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


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


def monitor_value(logs: dict[str, Any], monitor: str, who: str) -> float | None:
    """This epoch's value of ``monitor``; None when validation did not run this epoch (a
    ``val_*`` monitor and no ``val_*`` value at all: Keras' ``validation_freq``). A name
    the logs lack otherwise is a typo: an error listing what there is (the logs are the
    same on every rank, so every rank raises it alike)."""
    value = to_float(logs.get(monitor))
    if value is not None:
        return value
    if monitor.startswith("val_") and not any(str(k).startswith("val_") for k in logs):
        return None
    raise missing_monitor(monitor, logs, who)


class ForgeCallback(Callback):
    """Shared plumbing: communicator, registration, state, the fit's epoch end, printing
    on the chief only.

    Subclasses implement :meth:`train_begin` and :meth:`epoch_end` (Keras'
    ``on_train_begin`` and ``on_epoch_end`` are this class's: it finds the fit's other
    callbacks, syncs the epoch's logs before the first forge_dist callback sees them and
    completes the epoch after the last one; see :mod:`forge_dist.keras.fit`), and
    :meth:`epoch_complete` for what must wait for every other callback's epoch end (a
    save). Subclasses that keep state override :meth:`get_state`, :meth:`set_state` and
    :meth:`reset_state`, and call :meth:`begin_state` in :meth:`train_begin`.
    """

    #: The name this callback's state is stored under (made unique per model).
    state_key = "callback"
    #: Decides from the synced logs and its own state alone (no file, clock or chief
    #: fact): every rank can take the decision itself (see :meth:`_decide`).
    decides_locally = False
    #: Where this callback's :meth:`epoch_complete` runs among the fit's (lower first).
    complete_order = 0

    def __init__(self, communicator: Communicator | None = None, verbose: int = 0) -> None:
        super().__init__()
        # Keras 3 starts every callback with params=None; tf_keras sets them only in
        # set_params, which a custom loop's CallbackList without params never calls.
        self.params = getattr(self, "params", None)
        self.comm = resolve_comm(communicator)
        check_keras_supports(self.comm)
        self.verbose = verbose
        self.state_name = self.state_key
        self._fit: fitmod.Fit | None = None

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self.state_name = register(model, self)
        watch_train_function(model, self.comm)

    def state_id(self) -> str:
        """The name this callback's state is stored under: its kind and the setting that
        tells it from another of its kind (a monitor, a file's name), so reordering the
        list never hands one callback another's state (``#2`` only for two alike)."""
        return self.state_key

    # -- the fit (Keras' hooks; subclasses implement train_begin / epoch_end)
    def on_train_begin(self, logs: Any = None) -> None:
        fit, made = fitmod.current(self.model, self, ForgeCallback)
        self._fit = fit
        if made:
            fitmod.check(self.comm, fit, self.params)
            for cb in fit.callbacks:
                cb.fit_begin()
        self.train_begin(logs)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        fit = self._fit if self._fit is not None else fitmod.Fit([self])
        if logs is not None:
            self._sync_epoch(epoch, logs, fit)
        self.epoch_end(epoch, logs)
        for cb in fit.completing(self):
            cb.epoch_complete(epoch, logs)

    def fit_begin(self) -> None:
        """Before any callback of the fit begins (:class:`BackupAndRestore` restores
        here, so every other callback takes its restored state at its train begin)."""

    def train_begin(self, logs: Any = None) -> None:
        """``on_train_begin``, after the fit was found and checked."""

    def epoch_end(self, epoch: int, logs: Any = None) -> None:
        """``on_epoch_end``: ``logs`` already hold the values every rank agreed on."""

    def epoch_complete(self, epoch: int, logs: Any = None) -> None:
        """After every forge_dist callback of the fit has ended the epoch (loggers
        written, decisions taken): where a save belongs."""

    def derive(self, epoch: int, logs: dict[str, Any]) -> None:
        """Add computed values to the synced ``logs`` (:class:`DerivedMetric`), before
        any forge_dist callback sees them."""

    def validation_weight(self) -> float | None:
        """This rank's weight in the means of ``val_*`` values (:class:`SyncMetrics`)."""
        return None

    def _sync_epoch(self, epoch: int, logs: dict[str, Any], fit: fitmod.Fit) -> None:
        """Once per epoch, by the first forge_dist callback to see the logs: every number
        in them replaced by its mean across ranks, in place; with it, one check that every
        rank's deciding state is equal (then :meth:`_decide` needs no collective), and the
        derived values added."""
        reg = registry(self.model)
        if reg.synced_epoch == epoch:
            return
        members = fit.callbacks if fit.seen else registered(self.model)
        weights = [w for cb in members if (w := cb.validation_weight()) is not None]
        fitmod.sync_logs(
            self.comm,
            logs,
            f"epoch {epoch + 1} logs",
            weights[0] if weights else None,
            weight_all=False,
            check=deciding_digest(self.model, members),
        )
        reg.synced_epoch = epoch
        for cb in members:
            cb.derive(epoch, logs)

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
        restored = take_pending(self.model, self.state_name, self.state_key)
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

    def _say(self, message: str, level: int = logging.INFO) -> None:
        log.log(level, message)
        if self.verbose and self.comm.is_chief:
            # Keras' progress bar (verbose=1) leaves its line open on a terminal.
            bar = (self.params or {}).get("verbose") == 1 and sys.stdout.isatty()
            lead = "\n" if bar else ""
            print(f"{lead}[forge_dist] {message}", flush=True)

    def _say_as_keras(self, message: str) -> None:
        """A message Keras' own callback prints, in Keras' words and through Keras'
        printer (stdout, or the ``logging`` module when Keras' interactive logging is
        off), on the chief only."""
        log.debug(message)
        if self.verbose and self.comm.is_chief:
            _compat.print_msg(message)

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

    def _finish_mode(self, final: bool = False) -> None:
        """Resolve ``mode="auto"`` from the model's metrics into ``self.config``. Keras 3
        builds a compiled metric (and learns its direction) at the first step: at train
        begin a name that does not decide it waits for the first epoch end (``final``),
        where Keras itself resolves it; unresolved then, it is an error on every rank."""
        if not self._mode_resolved:
            try:
                mode = self._resolve_mode(self.monitor, self.mode)
            except ConfigurationError:
                if final:
                    raise
                return
            self.config = dataclasses.replace(self.config, mode=mode)
            self._mode_resolved = True
        if not final:
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

    # Keras' attributes, read and set as on Keras' callbacks (the state behind them is
    # the policy's frozen dataclass: a set replaces it).
    @property
    def wait(self) -> int:
        return int(self.state.wait)

    @wait.setter
    def wait(self, value: int) -> None:
        self._set(wait=int(value))

    @property
    def best(self) -> float | None:
        return self.state.best  # type: ignore[no-any-return]

    @best.setter
    def best(self, value: float | None) -> None:
        self._set(best=None if value is None else float(value))

    def _set(self, **changes: Any) -> None:
        self.state = dataclasses.replace(self.state, **changes)

    @property
    def monitor_op(self) -> Any:
        """Keras' comparison for the resolved mode (``ops.greater`` / ``ops.less``), or
        None while ``mode="auto"`` waits for the model's metrics."""
        if not getattr(self, "_mode_resolved", True):
            return None
        return _compat.monitor_op(self.config.mode)

    def get_state(self) -> dict[str, Any]:
        return {"mode": self.config.mode, **self.state.to_json()}

    def decision_inputs(self) -> Any:
        """The config and the state: what a decision reads besides the synced logs."""
        return [repr(self.config), self.get_state()]
