"""The callback-state protocol, and the per-model bookkeeping behind it.

Every forge_dist callback has a registered name (its ``state_key``, made unique per
model: ``"early_stopping"``, ``"early_stopping#2"``, ...), ``get_state()`` returning a
JSON-able dict (or None when it keeps no state) and ``set_state(state, weights)``.

Keras never shows a callback the other callbacks of a fit, so each callback registers
itself on its model. :class:`~forge_dist.keras.ChiefModelCheckpoint` stores
``{name: get_state()}`` in the manifest; :func:`~forge_dist.keras.restore_latest`
leaves each name's state here, and the callback takes it back in ``on_train_begin``.

A state may ask for the weights of an earlier epoch (``EarlyStopping``'s best weights)
by holding :data:`WEIGHTS_OF_EPOCH`; the restore loads them from the checkpoint of that
epoch and hands them to ``set_state``. Nothing outside a callback knows its keys.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

_ATTR = "_forge_dist_registry"

#: In a callback's state: the epoch (0-based) whose end-of-epoch weights it needs back.
WEIGHTS_OF_EPOCH = "weights_of_epoch"


@dataclass
class Restored:
    """What a callback gets back: its state, and the weights it asked for (or None)."""

    state: dict[str, Any]
    weights: list[Any] | None = None


@dataclass
class Registry:
    callbacks: list[weakref.ref] = field(default_factory=list)
    pending: dict[str, Restored] = field(default_factory=dict)  # restored, not yet taken
    restored_epoch: int | None = None
    restored_step: int | None = None
    #: The last epoch the restored checkpoint completed (-1: none), and a count of
    #: restores, so a logger cuts its logs back once per restore.
    restored_complete_epoch: int = -1
    restores: int = 0
    #: Directions ("up"/"down") of metrics forge_dist computes (DerivedMetric).
    directions: dict[str, str] = field(default_factory=dict)
    #: The run each checkpoint root of this model belongs to (restored or started).
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The epoch whose logs SyncMetrics synced, having checked that every rank's deciding
    #: state agrees (see ForgeCallback._decide); None: not this fit.
    synced_epoch: int | None = None
    #: The fit under way (:class:`forge_dist.keras.fit.Fit`), made at its train begin.
    fit: Any = None
    # Set by fit_resumed around the fit that finishes an interrupted epoch:
    batch_offset: int = 0  # batches of this epoch done before this fit began
    #: Set by fit_resumed(shard=True) for its fits: ``(samples in an epoch, batch_size,
    #: world size)``, and the global samples of this epoch done before this fit began.
    shard: tuple[int, int, int] | None = None
    sample_offset: int = 0
    partial_fit: bool = False  # another fit follows: training does not end here
    display_epochs: int | None = None  # the run's epochs, for the progress bar
    #: fit_resumed(shuffle=True): the seed of every epoch's order (in each checkpoint).
    data_seed: int | None = None
    keep_state: bool = False  # a fit that continues the previous one: keep state


def registry(model: Any) -> Registry:
    reg = getattr(model, _ATTR, None)
    if reg is None:
        reg = Registry()
        object.__setattr__(model, _ATTR, reg)  # bypass Keras' attribute tracking
    return reg


def register(model: Any, callback: Any) -> str:
    """Register ``callback`` on ``model``; return its unique name."""
    reg = registry(model)
    alive = [r for r in reg.callbacks if r() is not None and r() is not callback]
    taken = {getattr(r(), "state_name", None) for r in alive}
    base = callback.state_id()
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}#{n}"
    alive.append(weakref.ref(callback))
    reg.callbacks = alive
    return key


def register_fit(model: Any, callbacks: list[Any]) -> None:
    """A fit begins with ``callbacks``: they alone are the model's now (a callback of an
    earlier fit neither saves its state nor takes a name), named in list order."""
    reg = registry(model)
    reg.callbacks = []
    for cb in callbacks:
        cb.state_name = register(model, cb)


def collect_state(model: Any) -> dict[str, Any]:
    """``{name: state}`` of every registered callback that keeps state."""
    return {cb.state_name: s for cb in registered(model) if (s := cb.get_state()) is not None}


def deciding_digest(model: Any, callbacks: list[Any] | None = None) -> str:
    """A digest of what the locally deciding callbacks decide from, besides the synced
    logs (each one's :meth:`decision_inputs`: its config and state, and the learning
    rate for the one that reads it), of ``callbacks`` (the fit's; default: every one
    registered on ``model``). Equal on every rank, or the ranks would decide
    differently. Nothing here runs a TensorFlow op unless a callback's inputs need one:
    an eager op every epoch cost ~3x the metric all-gather itself at 8 ranks on 2 cores."""
    import hashlib
    import json

    members = registered(model) if callbacks is None else callbacks
    states = [(cb.state_name, cb.decision_inputs()) for cb in members if cb.decides_locally]
    text = json.dumps(states, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def registered(model: Any) -> list[Any]:
    """The forge_dist callbacks registered on ``model``, in registration order."""
    return [cb for ref in registry(model).callbacks if (cb := ref()) is not None]


def set_pending(
    model: Any,
    states: dict[str, Restored],
    epoch: int | None,
    step: int | None = None,
    epoch_done: bool = True,
) -> None:
    reg = registry(model)
    reg.pending = dict(states)
    reg.restored_epoch, reg.restored_step = epoch, step
    if epoch is not None:
        reg.restored_complete_epoch = epoch if epoch_done else epoch - 1
    reg.restores += 1


def root_key(url: str) -> str:
    """How a checkpoint root is named in :attr:`Registry.runs`."""
    return str(url).rstrip("/")


def restored_position(model: Any, seen: int) -> tuple[int, int, int] | None:
    """``(last complete epoch, step, restores)`` of a restore this caller has not acted
    on yet (``seen`` is the ``restores`` count it last acted on), else None. Logs past
    that position come from an attempt that no checkpoint covers."""
    reg = registry(model)
    if reg.restores == seen or reg.restored_step is None or reg.keep_state:
        return None
    return reg.restored_complete_epoch, reg.restored_step, reg.restores


def take_pending(model: Any, name: str, legacy: str | None = None) -> Restored | None:
    """The restored state stored under ``name`` (or, from a checkpoint written before
    names carried settings, under the bare ``legacy`` kind)."""
    pending = registry(model).pending
    found = pending.pop(name, None)
    if found is None and legacy is not None and "[" in name:
        found = pending.pop(legacy, None)
    return found
