"""``SyncTerminateOnNaN``: a non-finite loss on any rank stops every rank at that batch."""

from __future__ import annotations

import math
from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import NonFiniteLossError
from forge_dist.keras._compat import to_float
from forge_dist.keras.callbacks.base import ForgeCallback


class SyncTerminateOnNaN(ForgeCallback):
    """Keras' ``TerminateOnNaN`` for every rank at once.

    At each batch end the ranks agree (one tiny all-reduce) whether any rank's ``loss``
    is NaN or infinite; if so every rank stops after that same batch, and the chief
    says which ranks saw what. Plain ``TerminateOnNaN`` would stop only the rank that
    saw it, leaving the others waiting in the next collective. With
    ``raise_error=True`` (Keras' argument) every rank raises
    :class:`~forge_dist.errors.NonFiniteLossError` (a ``RuntimeError``) instead, so no
    ``on_train_end`` runs (a backup is kept as it is).
    """

    state_key = "terminate_on_nan"

    def __init__(
        self,
        raise_error: bool = False,
        communicator: Communicator | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__(communicator, verbose)
        self.raise_error = bool(raise_error)
        self.stopped_batch: tuple[int, int] | None = None  # (epoch, batch), 0-based
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        loss = to_float((logs or {}).get("loss"))
        bad = loss is not None and not math.isfinite(loss)
        where = f"epoch {self._epoch + 1}, batch {batch + 1}"
        if not self.comm.any(bad, name=f"SyncTerminateOnNaN({where})"):
            return
        seen = self.comm.allgather(loss, name=f"SyncTerminateOnNaN({where}) losses")
        ranks = ", ".join(
            f"rank {r}: {v}" for r, v in enumerate(seen) if v is not None and not math.isfinite(v)
        )
        self.stopped_batch = (self._epoch, batch)
        if self.raise_error:
            raise NonFiniteLossError(
                f"NaN or Inf loss encountered at batch {batch} (epoch {self._epoch + 1}; "
                f"{ranks}). Terminating training immediately, on every rank."
            )
        self.model.stop_training = True
        self._say_as_keras(
            f"Batch {batch}: Invalid loss, terminating training ({ranks}; every rank stops "
            f"after this batch of epoch {self._epoch + 1})"
        )
