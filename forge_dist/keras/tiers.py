"""Two checkpoint tiers on the Keras side: ``ChiefModelCheckpoint(local_directory=)``'s
fast folder, checked at construction and set up at train begin; the copying itself is
:mod:`forge_dist.storage.tiers` (see ``docs/DESIGN.md``, "Two tiers")."""

from __future__ import annotations

import os
from typing import Any

from forge_dist.errors import ConfigurationError
from forge_dist.keras import run as run_mod
from forge_dist.keras.preflight import check_room


def local_tier(url: Any, durable: Any, keep_last: Any) -> Any:
    """The fast tier's store, checked on every rank at construction."""
    from forge_dist.keras.callbacks.base import check_positive_int
    from forge_dist.storage import CheckpointStore

    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"local_directory must be a non-empty string, got {url!r}")
    check_positive_int("local_keep_last", keep_last, allow_none=True)
    local = CheckpointStore(url)
    if _same_place(local.url, durable.url):
        raise ConfigurationError(
            f"local_directory is the checkpoint directory itself ({durable.display}): pass a "
            "fast node-local folder (a tmpfs, a local SSD), or leave it out"
        )
    return local


def _same_place(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = u.removeprefix("file://")
        return u.rstrip("/") if "://" in u else os.path.abspath(u)

    return norm(a) == norm(b)


def start(cb: Any) -> None:
    """Chief, at train begin, after the durable root's own checks (``cb`` a
    ``ChiefModelCheckpoint``): the fast root is writable, has room, holds no other run's
    steps; ``cb`` gets its lease there and its replicator, and this run's steps there
    that are not durable yet are copied again first."""
    from forge_dist.storage.tiers import Replicator

    local = cb.local_store
    local.probe_writable()
    infos = local.list()
    check_room(local, cb.model, cb.local_retention(), cb.async_save, infos)
    assert cb.run is not None
    run_id = cb.run["id"]
    mine = [c for c in infos if c.manifest is not None and c.manifest.run.get("id") == run_id]
    others = [c for c in infos if c not in mine]
    if others and cb.overwrite is None:
        raise run_mod.foreign_steps_error(local.display, others, cb.overwrite_remedy)
    if others:
        cb._clear_old_steps(others, local)
    cb._local_lease = local.take_lease(run_id)
    cb.replicator = Replicator(local, cb.store, cb._lease)
    durable = set(cb.store.steps())
    for c in mine:
        if c.step not in durable and local.is_intact(c, "fast"):
            cb._say(f"step {c.step} in {local.display} is not durable yet: copying it")
            cb.replicator.submit(c.step)
