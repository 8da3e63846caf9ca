"""``ChiefTensorBoard``: Keras' TensorBoard, written by the chief only, with the synced
values, to any fsspec URL, and consistent with the checkpoints after a resume."""

from __future__ import annotations

import os
import time
from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras._compat import to_float
from forge_dist.keras._state import restored_position
from forge_dist.keras.callbacks.base import ForgeCallback
from forge_dist.keras.callbacks.sync_metrics import sync_logs
from forge_dist.keras.tb_events import ScalarWriter, truncate_events
from forge_dist.storage.logdir import LogDir

UPDATE_FREQ = ("epoch", "batch")


class ChiefTensorBoard(ForgeCallback):
    """Keras' ``TensorBoard`` for a distributed job.

    Only the chief writes; other ranks write nothing anywhere. Epoch scalars
    (``epoch_<name>`` in ``train/`` and ``validation/``, step = epoch) are the values
    every rank agreed on, the same numbers as the CSV and the manifest (put it after
    :class:`SyncMetrics`). With ``update_freq="batch"`` or N, batch scalars
    (``batch_<name>``, step = the optimizer's iteration, so a resumed run continues
    the curve) are averaged across ranks at those batches. Histograms, images, the
    graph and the profiler are Keras' own TensorBoard's, run on the chief.

    ``log_dir`` is any fsspec URL. Events are written to a local folder (``log_dir``
    itself when it is local) and copied to the URL at each epoch end, at train end and
    on a preemption save, each file in one piece. Each checkpoint records how far the
    logs go; after a resume the chief first removes from the event files every value
    past the restored step, so every tag has exactly one value per step.
    """

    state_key = "tensorboard"

    def __init__(
        self,
        log_dir: str = "logs",
        histogram_freq: int = 0,
        write_graph: bool = True,
        write_images: bool = False,
        write_steps_per_second: bool = False,
        update_freq: str | int = "epoch",
        profile_batch: int | tuple[int, int] = 0,
        embeddings_freq: int = 0,
        embeddings_metadata: Any = None,
        storage_options: dict[str, Any] | None = None,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator)
        if update_freq not in UPDATE_FREQ and (
            isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1
        ):
            raise ConfigurationError(
                f"update_freq must be 'epoch', 'batch' or a positive int, got {update_freq!r}"
            )
        for name, v in (("histogram_freq", histogram_freq), ("embeddings_freq", embeddings_freq)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigurationError(f"{name} must be an int >= 0, got {v!r}")
        keras_features = bool(
            histogram_freq or write_images or write_graph or profile_batch or embeddings_freq
        )
        if self.comm.collective_saves and (histogram_freq or write_images or embeddings_freq):
            raise ConfigurationError(
                "histogram_freq, write_images and embeddings_freq read the model's variables, "
                "which under MultiWorkerMirroredStrategy needs every worker; only scalars "
                "are written by the chief there"
            )
        self.log = LogDir(log_dir, storage_options, "TensorBoard log_dir")
        # Keras' attributes
        self.log_dir, self.histogram_freq, self.embeddings_freq = (
            log_dir,
            histogram_freq,
            embeddings_freq,
        )
        self.write_graph, self.write_images = write_graph, write_images
        self.every = 1 if update_freq == "batch" else update_freq
        self.update_freq = update_freq
        self.write_steps_per_second = bool(write_steps_per_second)
        self._keras_args = dict(
            histogram_freq=histogram_freq,
            write_graph=write_graph and not self.comm.collective_saves,
            write_images=write_images,
            update_freq="epoch",  # scalars are ours
            profile_batch=profile_batch,
            embeddings_freq=embeddings_freq,
            embeddings_metadata=embeddings_metadata,
        )
        # Under MWMS reading variables on the chief alone is unsafe: scalars only there.
        self._use_keras = keras_features and not self.comm.collective_saves
        self._inner: Any = None
        self._writers: dict[str, ScalarWriter] = {}
        self.last_epoch = -1  # the last epoch whose scalars were written
        self.last_step = 0  # the last iteration a batch scalar was written for
        self._restores_seen = 0
        self._batches = 0
        self._t_epoch = self._t_batch = 0.0
        self._iterations_at_epoch_start = 0

    def state_id(self) -> str:
        return f"{self.state_key}[{str(self.log_dir).rstrip('/').rsplit('/', 1)[-1]}]"

    # -- the state protocol: how far the logs go (recorded in each manifest)
    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.last_epoch, "step": self.last_step}

    # -- set-up (chief only)
    def set_model(self, model: Any) -> None:
        super().set_model(model)
        if self.comm.is_chief and self._use_keras and self._inner is None:
            self._inner = _compat.keras.callbacks.TensorBoard(
                log_dir=self.log.local, **self._keras_args
            )
        if self._inner is not None:
            self._inner.set_model(model)

    def set_params(self, params: Any) -> None:
        super().set_params(params)
        if self._inner is not None:
            self._inner.set_params(params)

    def _writer(self, sub: str) -> ScalarWriter:
        if sub not in self._writers:
            self._writers[sub] = ScalarWriter(os.path.join(self.log.local, sub))
        return self._writers[sub]

    def _iterations(self) -> int:
        return _compat.iterations(self.model)

    # -- Keras hooks
    def train_begin(self, logs: Any = None) -> None:
        self.begin_state()
        self._agree("ChiefTensorBoard(train begin)", self._start)

    def _start(self) -> None:
        """Chief: probe the URL, cut the logs back to the restored step, start writing."""
        self.log.probe()
        position = restored_position(self.model, self._restores_seen)
        if position is not None:  # events past the checkpoint: an attempt nothing covers
            epoch, step, self._restores_seen = position
            self.log.rewrite_each(lambda path: truncate_events(path, epoch, step))
            self.last_epoch, self.last_step = epoch, step
        if self._inner is not None:
            self._inner.on_train_begin(None)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._batches = 0
        self._t_epoch = time.perf_counter()
        if self.comm.is_chief:
            self._iterations_at_epoch_start = self._iterations()
            if self._inner is not None:
                self._inner.on_epoch_begin(epoch, None)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._t_batch = time.perf_counter()
        if self._inner is not None:
            self._inner.on_train_batch_begin(batch, None)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self._inner is not None:
            self._inner.on_train_batch_end(batch, None)
        if self.update_freq == "epoch":
            return
        self._batches += 1
        if self._batches % self.every:
            return
        values = dict(logs or {})
        # Every rank: the batch values averaged across ranks (one small collective).
        sync_logs(self.comm, values, f"ChiefTensorBoard(batch {batch})")
        if not self.comm.is_chief:
            return
        step = self._iterations()
        scalars = {f"batch_{k}": v for k, v in values.items() if to_float(v) is not None}
        if self.write_steps_per_second:
            scalars["batch_steps_per_second"] = 1.0 / max(time.perf_counter() - self._t_batch, 1e-9)
        self._writer("train").scalars(scalars, step)
        self.last_step = step

    def epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._agree(f"ChiefTensorBoard(epoch {epoch + 1})", lambda: self._epoch_end(epoch, logs))

    def _epoch_end(self, epoch: int, logs: Any) -> None:
        """Chief: the epoch's scalars (synced), Keras' histograms and images, mirror."""
        logs = dict(logs or {})
        train = {f"epoch_{k}": v for k, v in logs.items() if not k.startswith("val_")}
        val = {f"epoch_{k[4:]}": v for k, v in logs.items() if k.startswith("val_")}
        if self.write_steps_per_second:
            done = self._iterations() - self._iterations_at_epoch_start
            train["epoch_steps_per_second"] = done / max(time.perf_counter() - self._t_epoch, 1e-9)
        self._writer("train").scalars(train, epoch)
        if val:
            self._writer("validation").scalars(val, epoch)
            iteration = self._iterations()
            vs = {
                f"evaluation_{k[4:]}_vs_iterations": v for k, v in logs.items() if k[:4] == "val_"
            }
            self._writer("validation").scalars(vs, iteration)
        if self._inner is not None:
            self._inner.on_epoch_end(epoch, None)  # histograms, images, embeddings only
        self.last_epoch = epoch
        self.flush()

    def on_train_end(self, logs: Any = None) -> None:
        self._agree("ChiefTensorBoard(train end)", self._finish)

    def _finish(self) -> None:
        if self._inner is not None:
            self._inner.on_train_end(None)
        for w in self._writers.values():
            w.close()
        self._writers = {}
        self.log.mirror()

    def on_preemption(self) -> None:
        """Before the preemption save: everything written so far reaches the URL."""
        if self.comm.is_chief:
            self.flush()

    def flush(self) -> None:
        """Chief: flush the writers and copy new or grown files to the URL."""
        for w in self._writers.values():
            w.flush()
        self.log.mirror()
