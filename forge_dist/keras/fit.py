"""One ``fit``'s forge_dist callbacks, seen together.

Keras hands a callback the model, never the other callbacks of the fit. But the
guarantees depend on them: every rank's callbacks must make the same collective calls,
a logger and the checkpoint must agree on which epochs are done whatever their order,
and a plain Keras callback that decides or writes on its own (``EarlyStopping``,
``ModelCheckpoint``, ...) breaks a multi-rank job. So at train begin the first
forge_dist callback of a fit finds Keras' callback list (the object calling its hook)
and records this fit's forge_dist callbacks in list order (:class:`Fit`). From then on:

* the first of them to see an epoch's logs replaces them by their means across ranks
  (one all-gather), so every callback after it in the list, and every forge_dist
  callback wherever it stands, acts on values every rank agreed on;
* the last of them completes the epoch: each one's ``epoch_complete`` (the checkpoint's
  save, then the preemption check) runs after every logger has written the epoch and
  every decision is taken, so a checkpoint never covers an epoch its logs lack;
* before the first step every rank compares, in one all-gather, what it is about to
  run (its forge_dist callbacks in order, epochs and steps) and whether its list holds
  a Keras callback that would act on its own: any difference or such a callback is an
  error on every rank, before anything else collective.

Where no callback list is found (a custom loop calling the hooks itself) each callback
stands alone: it syncs the logs unless another did this epoch, and completes its own
epoch.
"""

from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

from forge_dist import policy
from forge_dist.comm import Communicator
from forge_dist.errors import CollectiveMismatchError, ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras._compat import to_float

log = logging.getLogger("forge_dist.keras")

#: Keras callbacks that go wrong when every rank runs them, and what to use instead.
REPLACEMENTS = {
    "EarlyStopping": "forge_dist.keras.SyncEarlyStopping",
    "ReduceLROnPlateau": "forge_dist.keras.SyncReduceLROnPlateau",
    "ModelCheckpoint": "forge_dist.keras.ChiefModelCheckpoint",
    "BackupAndRestore": "forge_dist.keras.BackupAndRestore",
    "CSVLogger": "forge_dist.keras.ChiefCSVLogger",
    "TensorBoard": "forge_dist.keras.ChiefTensorBoard",
    "TerminateOnNaN": "forge_dist.keras.SyncTerminateOnNaN",
    "RemoteMonitor": "forge_dist.keras.OnChief(keras.callbacks.RemoteMonitor(...))",
}

#: Keras' own callbacks that behave the same on every rank.
_HARMLESS = (
    "History",
    "ProgbarLogger",
    "LearningRateScheduler",
    "LambdaCallback",
    "SwapEMAWeights",
)

_noted: set[str] = set()  # user callback classes already pointed at OnChief


def replaceable(cb: Any) -> str | None:
    """The name of Keras' own callback ``cb`` if it breaks a multi-rank fit."""
    name = type(cb).__name__
    own = type(cb).__module__.startswith(("keras.", "tf_keras."))
    return name if own and name in REPLACEMENTS else None


def describe(cb: Any) -> str:
    """A callback as the fit check names it: its class, and what it monitors (an
    ``OnChief`` with what it wraps). Paths are left out: a rank may name its own."""
    name = type(cb).__name__
    inner = getattr(cb, "callback", None)
    if inner is not None:
        return f"{name}({type(inner).__name__})"
    monitor = getattr(cb, "monitor", None)
    return f"{name}[{monitor}]" if isinstance(monitor, str) else name


@dataclass
class Fit:
    """The forge_dist callbacks of one fit, in the order Keras calls them."""

    callbacks: list[Any]
    others: list[Any] = field(default_factory=list)  # every other callback of the list
    seen: bool = False  # Keras' callback list was found (else: stand-alone)
    source: Any = None  # a weak reference to that list

    def alone(self, cb: Any) -> bool:
        """``cb`` is not one of the list's own: no list was found, or another callback
        drives it (a wrapper calling its hooks): it ends its epochs by itself."""
        return not self.seen or not any(c is cb for c in self.callbacks)

    def first(self, cb: Any) -> bool:
        return self.alone(cb) or cb is self.callbacks[0]

    def last(self, cb: Any) -> bool:
        return self.alone(cb) or cb is self.callbacks[-1]

    def completing(self, cb: Any) -> list[Any]:
        """Whose ``epoch_complete`` runs when ``cb`` finishes its epoch end: every
        callback of the fit's (by ``complete_order``) after the last one, else none."""
        if not self.last(cb):
            return []
        members = [cb] if self.alone(cb) else self.callbacks
        return sorted(members, key=lambda c: c.complete_order)


def find_callback_list() -> Any:
    """Keras' ``CallbackList`` calling the current hook, or None."""
    cls = getattr(_compat.keras.callbacks, "CallbackList", None)
    if cls is None:
        return None
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, cls):
            return obj
        frame = frame.f_back
    return None


def current(model: Any, cb: Any, forge_cls: type) -> tuple[Fit, bool]:
    """This fit (made by the first forge_dist callback to begin it), and whether ``cb``
    is the one that made it."""
    from forge_dist.keras._state import register_fit, registry

    reg = registry(model)
    source = find_callback_list()
    if source is None:
        reg.synced_epoch = None
        return Fit([cb]), True
    if reg.fit is not None and reg.fit.source is not None and reg.fit.source() is source:
        return reg.fit, False
    members = list(source.callbacks)
    fit = Fit(
        [c for c in members if isinstance(c, forge_cls)],
        [c for c in members if not isinstance(c, forge_cls)],
        True,
        weakref.ref(source),
    )
    reg.fit = fit
    reg.synced_epoch = None
    register_fit(model, fit.callbacks)
    return fit, True


def check(comm: Any, fit: Fit, params: dict[str, Any] | None) -> None:
    """Every rank, at train begin of a multi-rank fit: one all-gather of what each rank
    is about to run; a Keras callback that acts on its own, or any difference between
    the ranks, is a :class:`ConfigurationError` on every rank."""
    if not fit.seen:
        return
    _progress_on_chief_only(comm, fit)
    if comm.size <= 1:
        return
    from forge_dist.keras._state import deciding_digest

    params = params or {}
    model = fit.callbacks[0].model
    mine = {
        "callbacks": [describe(cb) for cb in fit.callbacks],
        "keras": [n for cb in fit.others if (n := replaceable(cb))],
        "settings": {k: repr(params.get(k)) for k in ("epochs", "steps")},
        # what the decisions read besides the logs: the deciders' arguments and state
        "deciding": deciding_digest(model, fit.callbacks),
    }
    seen = comm.allgather(mine, name="train begin (the fit every rank runs)")
    for rank, theirs in enumerate(seen):
        for name in theirs["keras"]:
            raise ConfigurationError(
                f"keras.callbacks.{name} runs on every rank on its own in a job of "
                f"{comm.size} ranks (rank {rank}'s callbacks hold one): different decisions, "
                "the same file written by every rank, or one rank stopping while the others "
                f"wait; use {REPLACEMENTS[name]}"
            )
    for rank, theirs in enumerate(seen):
        for part, what in (("callbacks", "forge_dist callbacks"), ("settings", "fit settings")):
            if theirs[part] != seen[0][part]:
                raise ConfigurationError(
                    f"every rank must run the same fit, but rank {rank}'s {what} differ from "
                    f"rank 0's: {theirs[part]} vs {seen[0][part]} (each step and epoch end "
                    "is a collective every rank must join)"
                )
        if theirs["deciding"] != seen[0]["deciding"]:
            raise ConfigurationError(
                f"every rank must decide alike, but rank {rank}'s early-stopping / "
                "learning-rate callbacks were given other arguments (or restored other "
                "state) than rank 0's: build them the same way on every rank"
            )
    if comm.is_chief:
        _note_user_callbacks(fit)
        _note_optimizer(comm, fit)


def _progress_on_chief_only(comm: Any, fit: Fit) -> None:
    """Keras' progress bar prints on the chief only (every rank's bar interleaved in one
    job's output, with the same synced values at each epoch's end, said nothing more);
    a fit that finishes an interrupted epoch counts its epochs and that epoch's steps as
    the whole run does ("Epoch 4/10", then "5/8" where 4 of 8 steps ran before)."""
    from forge_dist.keras._state import registry

    if not fit.callbacks:
        return
    reg = registry(fit.callbacks[0].model)
    for cb in fit.others:
        if type(cb).__name__ == "ProgbarLogger":
            if not comm.is_chief:
                cb.verbose = 0
            if reg.display_epochs is not None:
                cb.epochs = reg.display_epochs
            if reg.batch_offset and getattr(cb, "target", None) is not None:
                cb.target += reg.batch_offset
                _count_from_offset(cb, reg)


def _count_from_offset(progbar: Any, reg: Any) -> None:
    """The bar's step count goes on from the batches the interrupted epoch had run (the
    offset is 0 again once that epoch's fit ends)."""
    update = type(progbar).on_train_batch_end

    def on_train_batch_end(batch: int, logs: Any = None) -> None:
        update(progbar, batch + reg.batch_offset, logs)

    progbar.on_train_batch_end = on_train_batch_end


def _note_optimizer(comm: Any, fit: Fit) -> None:
    """Say, on the chief, when the ranks' gradients are not averaged: each rank then
    trains its own model, and the weights part after the first step."""
    model = fit.callbacks[0].model if fit.callbacks else None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or comm.averages_gradients or _compat.averages_gradients(optimizer):
        return
    print(
        f"[forge_dist] warning: {type(optimizer).__name__} does not average gradients across "
        f"the {comm.size} ranks: each rank trains its own model. Compile with "
        "forge_dist.keras.DistributedOptimizer(optimizer)",
        flush=True,
    )


def _note_user_callbacks(fit: Fit) -> None:
    """Say once, on the chief, which of the user's own callbacks run on every rank."""
    for cb in fit.others:
        name = type(cb).__name__
        module = type(cb).__module__
        if module.startswith(("keras.", "tf_keras.")) and name in _HARMLESS:
            continue
        if replaceable(cb) or name in _noted:
            continue
        _noted.add(name)
        print(
            f"[forge_dist] note: {name} is not a forge_dist callback: it runs on every rank. "
            f"Wrap it in forge_dist.keras.OnChief({name}(...)) to run it once, on the chief, "
            "with the values every rank agreed on",
            flush=True,
        )


def sync_logs(
    comm: Communicator,
    logs: dict[str, Any],
    name: str,
    weight: float | None = None,
    weight_all: bool = False,
    check: str | None = None,
) -> None:
    """Replace every number in ``logs`` by its mean across ranks, in place (every rank
    calls it; keys in sorted order). ``val_*`` values, or all with ``weight_all``, are
    weighted by each rank's ``weight`` when every rank gave one. ``check`` (a digest of
    the state decisions are taken from) must be equal on every rank, else every rank
    raises."""
    numeric = {k: f for k in sorted(logs) if (f := to_float(logs[k])) is not None}
    keys = tuple(numeric)
    rows = comm.allgather((keys, [numeric[k] for k in keys], weight, check), name=name)
    checks = [row[3] for row in rows]
    if len(set(checks)) > 1:
        bad = [r for r, c in enumerate(checks) if c != checks[0]]
        raise CollectiveMismatchError(
            f"{name}: the early-stopping / learning-rate state of rank(s) "
            f"{', '.join(map(str, bad))} differs from rank 0's, so the ranks would decide "
            "differently (were the callbacks built with other arguments, or restored from "
            "other checkpoints, on some ranks?)"
        )
    key_sets = {r: row[0] for r, row in enumerate(rows)}
    if len(set(key_sets.values())) > 1:
        ref = key_sets[0]
        diffs = [f"rank {r}: {sorted(set(k) ^ set(ref))}" for r, k in key_sets.items() if k != ref]
        raise CollectiveMismatchError(
            f"{name}: ranks logged different metrics (differences from rank 0: "
            + "; ".join(diffs)
            + ")"
        )
    plain, weighted = policy.mean_over_ranks([row[1] for row in rows], [r[2] for r in rows])
    for i, k in enumerate(keys):
        use_weight = weight_all or k.startswith("val_")
        logs[k] = weighted[i] if use_weight else plain[i]
