"""Per-model bookkeeping shared by forge_dist's callbacks.

Keras never shows a callback the other callbacks of a fit, so each stateful forge_dist
callback registers itself on its model; :class:`ChiefModelCheckpoint` collects their
state into the manifest, and :func:`restore_latest` leaves restored state here for them
to pick up in ``on_train_begin``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

_ATTR = "_forge_dist_registry"


@dataclass
class Registry:
    callbacks: list[weakref.ref] = field(default_factory=list)
    pending: dict[str, Any] = field(default_factory=dict)  # state restored from a checkpoint
    restored_epoch: int | None = None
    # Set by fit_resumed around the fit that finishes an interrupted epoch:
    batch_offset: int = 0  # batches of this epoch done before this fit began
    partial_fit: bool = False  # another fit follows: training does not end here
    keep_state: bool = False  # a fit that continues the previous one: keep state


def registry(model: Any) -> Registry:
    reg = getattr(model, _ATTR, None)
    if reg is None:
        reg = Registry()
        object.__setattr__(model, _ATTR, reg)  # bypass Keras' attribute tracking
    return reg


def register(model: Any, callback: Any) -> str:
    """Register ``callback`` on ``model``; return its unique state key."""
    reg = registry(model)
    alive = [r for r in reg.callbacks if r() is not None and r() is not callback]
    base = callback.state_key
    taken = {r().state_key_unique for r in alive if hasattr(r(), "state_key_unique")}
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}#{n}"
    alive.append(weakref.ref(callback))
    reg.callbacks = alive
    return key


def collect_state(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ref in registry(model).callbacks:
        cb = ref()
        if cb is not None and hasattr(cb, "get_state"):
            out[cb.state_key_unique] = cb.get_state()
    return out


def take_pending(model: Any, key: str) -> Any:
    return registry(model).pending.pop(key, None)
