"""Keras adapters (Keras 3, or tf_keras with ``TF_USE_LEGACY_KERAS=1``).

Importing this package imports Keras (and TensorFlow); ``import forge_dist`` does not.
The callbacks live one a module in :mod:`forge_dist.keras.callbacks`; the asynchronous
writer in :mod:`.async_checkpoint` and its snapshot in :mod:`.snapshot`; restoring in
:mod:`.restore`; the recommended stack in :mod:`.stack`.
"""

from __future__ import annotations

from forge_dist.keras._compat import FLAVOR
from forge_dist.keras.async_checkpoint import AsyncCheckpointer
from forge_dist.keras.callbacks import (
    BackupAndRestore,
    BroadcastInitialState,
    ChiefCSVLogger,
    ChiefModelCheckpoint,
    ChiefTensorBoard,
    ConsistencyGuard,
    DerivedMetric,
    OnChief,
    PreemptionCheckpoint,
    SyncEarlyStopping,
    SyncMetrics,
    SyncReduceLROnPlateau,
    SyncTerminateOnNaN,
)
from forge_dist.keras.optimizer import DistributedOptimizer
from forge_dist.keras.restore import RestoreResult, restore_latest
from forge_dist.keras.resume import fit_resumed
from forge_dist.keras.stack import production_callbacks

__all__ = [
    "FLAVOR",
    "AsyncCheckpointer",
    "BackupAndRestore",
    "BroadcastInitialState",
    "ChiefCSVLogger",
    "ChiefModelCheckpoint",
    "ChiefTensorBoard",
    "ConsistencyGuard",
    "DerivedMetric",
    "DistributedOptimizer",
    "OnChief",
    "PreemptionCheckpoint",
    "RestoreResult",
    "SyncEarlyStopping",
    "SyncMetrics",
    "SyncReduceLROnPlateau",
    "SyncTerminateOnNaN",
    "fit_resumed",
    "production_callbacks",
    "restore_latest",
]
