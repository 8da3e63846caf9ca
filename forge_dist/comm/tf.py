"""``tf`` backend: a tf.distribute strategy inside one process (MirroredStrategy).

MirroredStrategy runs every replica in this one process and Keras already reduces
metrics across its replicas, so there is a single rank: collectives return their input.
MultiWorkerMirroredStrategy (several processes) is a separate backend, not this one.
"""

from __future__ import annotations

from typing import Any

from forge_dist.comm.base import LocalCommunicator
from forge_dist.errors import ConfigurationError


class TFStrategyCommunicator(LocalCommunicator):
    backend = "tf"

    def __init__(self, timeout: float | None = None, strategy: Any = None) -> None:
        super().__init__(timeout)
        import tensorflow as tf

        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        kind = type(self.strategy).__name__
        if "MultiWorker" in kind or "CollectiveAll" in kind:
            raise ConfigurationError(
                f"{kind} runs several worker processes; the 'tf' backend of this version "
                "covers MirroredStrategy (one process). Use mpirun with backend='mpi'."
            )

    @property
    def num_replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def describe(self) -> str:
        return (
            f"tf rank 0 of 1 ({type(self.strategy).__name__}, "
            f"{self.num_replicas} replicas in this process)"
        )
