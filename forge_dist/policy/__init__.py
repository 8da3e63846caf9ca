"""Pure decisions: no TensorFlow, no I/O. Unit-tested with plain lists.

Each rule takes a frozen config, the previous state and this epoch's facts, and returns
a decision holding the *new* state, a reason and a readable message; the Keras adapters
in :mod:`forge_dist.keras` only gather the facts, agree on them across ranks and act.

The semantics are Keras 3's ``EarlyStopping``, ``ReduceLROnPlateau`` and
``ModelCheckpoint(save_best_only=True)`` (same ``min_delta`` sign, baseline, wait and
cooldown counters), with one deliberate difference: a NaN is never an improvement, not
even as the first value (Keras 3 would adopt it as "best" and never improve again).

One module per rule: :mod:`.core` (directions, checks, the improvement test),
:mod:`.early_stop`, :mod:`.plateau`, :mod:`.checkpoint` (save and retention, and the
one ranking of steps by a metric), :mod:`.metrics` (means across ranks),
:mod:`.preemption` (how often ranks look for a signal, whether the notice fits a save),
:mod:`.shards` (which samples each rank trains on when every rank holds the whole
dataset).
"""

from forge_dist.policy.checkpoint import (
    Retention,
    RetentionDecision,
    SaveDecision,
    decide_retention,
    rank_best,
    save_step,
)
from forge_dist.policy.core import (
    MODES,
    Reason,
    check_count,
    check_mode,
    check_monitor,
    check_number,
    is_improvement,
    resolve_mode,
)
from forge_dist.policy.early_stop import (
    EarlyStopConfig,
    EarlyStopDecision,
    EarlyStopState,
    early_stop_step,
)
from forge_dist.policy.metrics import mean_over_ranks
from forge_dist.policy.plateau import PlateauConfig, PlateauDecision, PlateauState, plateau_step
from forge_dist.policy.preemption import check_spacing, notice_shortfall
from forge_dist.policy.shards import check_shardable, samples_done, shard_rows

__all__ = [
    "MODES",
    "EarlyStopConfig",
    "EarlyStopDecision",
    "EarlyStopState",
    "PlateauConfig",
    "PlateauDecision",
    "PlateauState",
    "Reason",
    "Retention",
    "RetentionDecision",
    "SaveDecision",
    "check_count",
    "check_mode",
    "check_monitor",
    "check_number",
    "check_shardable",
    "check_spacing",
    "decide_retention",
    "early_stop_step",
    "is_improvement",
    "mean_over_ranks",
    "notice_shortfall",
    "plateau_step",
    "rank_best",
    "resolve_mode",
    "samples_done",
    "save_step",
    "shard_rows",
]
