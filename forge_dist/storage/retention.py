"""Deleting what is no longer needed: retention of committed steps (the rule is
:func:`forge_dist.policy.decide_retention`), and removal of staging left by writers
that died. Only committed steps count; corrupt ones are neither counted nor deleted
(``verify`` reports them for a person to look at)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from forge_dist.errors import ConfigurationError, StorageError
from forge_dist.policy import Retention
from forge_dist.storage import _faults
from forge_dist.storage.types import GcReport, StagingInfo

if TYPE_CHECKING:
    from forge_dist.storage.lease import Lease
    from forge_dist.storage.store import CheckpointStore

log = logging.getLogger("forge_dist.storage")

#: Staging unchanged this long (seconds) may belong to a dead writer on another host.
DEFAULT_GRACE_S = 3600.0


def apply_retention(
    store: CheckpointStore,
    retention: Retention,
    *,
    dry_run: bool = False,
    protect: Sequence[int] = (),
    run_id: str | None = None,
    lease: Lease | None = None,
    protect_epochs: Sequence[int] = (),
) -> tuple[list[int], list[int]]:
    """Delete committed steps ``retention`` does not keep; return (kept, deleted).
    A step taken mid-epoch (a preemption's) lacks validation values: it is kept, not
    ranked, until a later epoch's end is committed. The newest committed step and the
    ``protect`` ones are always kept, and the newest step taken at the end of each of
    ``protect_epochs`` (the epochs whose weights a callback's state needs back, e.g.
    early stopping's best). With ``run_id`` only that run's steps are counted, ranked or
    deleted; another run's are left alone."""
    infos = [c for c in store.list() if c.readable]
    if run_id is not None:
        infos = [c for c in infos if c.manifest is not None and c.manifest.run.get("id") == run_id]
    monitor = retention.monitor
    metrics = {c.step: c.metrics.get(monitor) for c in infos} if monitor else None
    if protect_epochs:
        wanted, at_end = set(protect_epochs), {}
        for c in infos:  # (oldest first: the newest step of an epoch's end wins)
            if c.state.get("epoch_done", True) and c.state.get("epoch") in wanted:
                at_end[c.state["epoch"]] = c.step
        protect = [*protect, *at_end.values()]
    ends = [c.step for c in infos if c.state.get("epoch_done", True)]
    mid = [c.step for c in infos if not c.state.get("epoch_done", True)]
    superseded = [s for s in mid if any(e > s for e in ends)]
    decision = retention.decide([c.step for c in infos], metrics, protect, superseded)
    for step in decision.delete:
        if not dry_run:
            _faults.point(f"retention-delete:{step}")
            store.delete(step, lease=lease)
    return list(decision.keep), list(decision.delete)


def remove_staging(
    store: CheckpointStore,
    stale: Callable[[StagingInfo], bool],
    dry_run: bool,
    strict: bool = False,
) -> tuple[list[str], list[str]]:
    """Remove interrupted deletes, staging of dead local writers, and what ``stale``
    says; return (removed, kept). A live writer's staging is never removed. A removal
    that fails is logged and kept, or with ``strict`` raised."""
    removed: list[str] = []
    kept: list[str] = []
    for st in store.list_staging():
        if st.kind == "orphan" or not (st.kind == "del" or st.owner_dead or stale(st)):
            kept.append(st.name)
            continue
        if not dry_run:
            try:
                store.remove_staging(st.name)
            except StorageError as e:
                if strict:
                    raise
                log.warning("could not remove %s: %s", st.name, e)
                kept.append(st.name)
                continue
        removed.append(st.name)
    return removed, kept


def gc(
    store: CheckpointStore,
    retention: Retention | None = None,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    strict: bool = False,
) -> GcReport:
    """Apply retention, then remove staging that is an interrupted delete, whose writer
    ran on this host and is gone, or in which nothing changed for ``grace_s`` seconds."""
    if grace_s < 0:
        raise ConfigurationError(f"grace_s must be >= 0, got {grace_s}")
    report = GcReport(dry_run=dry_run)
    report.kept_steps, report.deleted_steps = apply_retention(
        store, retention or Retention(), dry_run=dry_run
    )
    report.removed_staging, report.kept_staging = remove_staging(
        store, lambda st: st.age_s is None or st.age_s > grace_s, dry_run, strict
    )
    return report
