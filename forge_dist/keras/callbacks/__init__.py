"""Keras callbacks that agree across ranks (Keras 3 and tf_keras), one module each.

Each callback gathers its facts, lets the chief decide with :mod:`forge_dist.policy`,
broadcasts the decision (or the error) and applies it on every rank in the same epoch.
Every rank makes the same collective calls in the same order; a configuration error is
raised on every rank, never as a warning on one. See docs/DESIGN.md, "Callbacks".
"""

from forge_dist.keras.callbacks.backup import BackupAndRestore
from forge_dist.keras.callbacks.base import ForgeCallback, check_keras_supports
from forge_dist.keras.callbacks.broadcast import (
    BroadcastInitialState,
    assign_optimizer_variables,
    broadcast_model_state,
)
from forge_dist.keras.callbacks.checkpoint import ChiefModelCheckpoint
from forge_dist.keras.callbacks.csv_logger import ChiefCSVLogger
from forge_dist.keras.callbacks.derived import DerivedMetric
from forge_dist.keras.callbacks.early_stopping import SyncEarlyStopping
from forge_dist.keras.callbacks.guard import ConsistencyGuard
from forge_dist.keras.callbacks.on_chief import OnChief
from forge_dist.keras.callbacks.preemption import PreemptionCheckpoint
from forge_dist.keras.callbacks.reduce_lr import SyncReduceLROnPlateau
from forge_dist.keras.callbacks.sync_metrics import SyncMetrics, sync_logs
from forge_dist.keras.callbacks.tensorboard import ChiefTensorBoard
from forge_dist.keras.callbacks.terminate_on_nan import SyncTerminateOnNaN

__all__ = [
    "BackupAndRestore",
    "BroadcastInitialState",
    "ChiefCSVLogger",
    "ChiefModelCheckpoint",
    "ChiefTensorBoard",
    "ConsistencyGuard",
    "DerivedMetric",
    "ForgeCallback",
    "OnChief",
    "PreemptionCheckpoint",
    "SyncEarlyStopping",
    "SyncMetrics",
    "SyncReduceLROnPlateau",
    "SyncTerminateOnNaN",
    "assign_optimizer_variables",
    "broadcast_model_state",
    "check_keras_supports",
    "sync_logs",
]
