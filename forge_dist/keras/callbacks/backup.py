"""``BackupAndRestore``: Keras' callback of that name, with the store's guarantees: a
plain ``model.fit`` that was interrupted continues where it stopped."""

from __future__ import annotations

from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras._state import registry, root_key
from forge_dist.keras.callbacks.base import is_save_freq
from forge_dist.keras.callbacks.checkpoint import ChiefModelCheckpoint
from forge_dist.keras.saving import WEIGHTS_FILE


class _StartAt:
    """What tf_keras' ``fit`` asks for the epoch to start at (its worker training
    state's one method)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def maybe_load_initial_counters_from_ckpt(
        self, steps_per_epoch: Any, initial_epoch: int, mode: Any = None
    ) -> tuple[int, int]:
        return max(self.epoch, initial_epoch), 0


class BackupAndRestore(ChiefModelCheckpoint):
    """Keras' ``BackupAndRestore(backup_dir)``: put it in a plain ``model.fit`` and run
    the same script again after an interruption; the fit continues from the last epoch
    that ended, on every rank, with every forge_dist callback's state (early-stopping
    patience, the learning rate, the best value), the CSV and TensorBoard cut back to it.

    ``backup_dir`` is any fsspec URL; each backup is a committed step there (weights and
    optimizer state, written by the chief only, atomically, verifiable with
    ``forge-dist verify``). ``save_freq`` is ``"epoch"`` or every N batches; a fit
    restarts at the start of the epoch that was interrupted (a backup taken mid-epoch,
    or by :class:`PreemptionCheckpoint`, is for :func:`fit_resumed`, which continues
    mid-epoch). ``double_checkpoint=True`` keeps the previous backup too, so a damaged
    newest one is skipped for it. ``delete_checkpoint=True`` (Keras' default) removes the
    backups when the fit ends normally. Unlike Keras', the restored epoch is exactly
    where training stood: the weights, the optimizer's state and the callbacks' state of
    that epoch's end (Keras restores the newest weights, mid-epoch ones included, and
    trains that epoch again from its start).
    """

    state_key = "backup"
    overwrite_remedy = (
        "remove those steps (forge-dist rm), or give BackupAndRestore another backup_dir"
    )

    def __init__(
        self,
        backup_dir: str,
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        storage_options: dict[str, Any] | None = None,
        communicator: Communicator | None = None,
        verbose: int = 0,
        async_save: bool = False,
    ) -> None:
        if not backup_dir or not isinstance(backup_dir, str):
            raise ConfigurationError(
                f"Empty `backup_dir` argument passed (got {backup_dir!r}): give the folder "
                "(any fsspec URL) the backups go in"
            )
        if not is_save_freq(save_freq):
            raise ConfigurationError(
                f"Invalid value for argument `save_freq`. Received: save_freq={save_freq!r}. "
                "Expected either 'epoch' or a positive integer."
            )
        if backup_dir.lower().endswith((".keras", ".h5")) or "{" in backup_dir:
            raise ConfigurationError(
                f"backup_dir is a folder, not a Keras file path: got {backup_dir!r}"
            )
        super().__init__(
            backup_dir,
            save_weights_only=True,
            save_freq=save_freq,
            keep_last=2 if double_checkpoint else 1,
            storage_options=storage_options,
            communicator=communicator,
            verbose=verbose,
            async_save=async_save,
        )
        self.backup_dir = backup_dir
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self._current_epoch = 0  # epochs done (Keras' attribute)
        self._last_batch_seen = 0

    # -- restoring, before any callback of the fit begins
    def fit_begin(self) -> None:
        from forge_dist.keras.restore import restore

        model = self.model
        self._current_epoch = 0
        if not model.built:
            has_backup = self._agree(
                "BackupAndRestore(has backups)",
                lambda: self.store.root_exists() and bool(self.store.list()),
            )
            if has_backup:
                raise ConfigurationError(
                    "To use the BackupAndRestore callback, your model must be built before "
                    f"you call `fit()` ({self.directory} holds backups to restore into it). "
                    "Build it beforehand, e.g. by calling it on a batch of data."
                )
            return
        result = restore(
            model,
            self.store.url,
            self.storage_options,
            self.comm,
            verify="full",
            verbose=1,  # a resume says what it restored (on the chief)
            epoch_end_only=True,
        )
        if not result.restored:
            return
        self._current_epoch = result.initial_epoch
        _start_at(model, result.initial_epoch)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._last_batch_seen = batch
        super().on_train_batch_end(batch, logs)

    def epoch_complete(self, epoch: int, logs: Any = None) -> None:
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        super().epoch_complete(epoch, logs)

    def on_train_end(self, logs: Any = None) -> None:
        super().on_train_end(logs)
        _start_at(self.model, None)
        if self.delete_checkpoint and not registry(self.model).partial_fit:
            self._agree("BackupAndRestore(delete the backups)", self._delete_backups)

    def _delete_backups(self) -> None:
        """Chief: the fit ended normally; its backups go, then the folder if empty."""
        store = self.store
        if not store.root_exists():
            return
        for info in store.list():
            store.delete(info.step, lease=self._lease)
        store.remove_root()
        self._lease = None
        registry(self.model).runs.pop(root_key(self.store.url), None)
        self.run = None

    # -- Keras' attributes (paths of the newest and the previous backup)
    def _backup_paths(self) -> list[tuple[str, str]]:
        infos = self.store.list() if self.store.root_exists() else []
        root = self.store.url.rstrip("/")
        return [
            (f"{root}/{i.name}/{WEIGHTS_FILE}", f"{root}/{i.name}/manifest.json")
            for i in reversed(infos)
        ]

    @property
    def _weights_path(self) -> str | None:
        paths = self._backup_paths()
        return paths[0][0] if paths else None

    @property
    def _training_metadata_path(self) -> str | None:
        paths = self._backup_paths()
        return paths[0][1] if paths else None

    @property
    def _prev_weights_path(self) -> str | None:
        paths = self._backup_paths()
        return paths[1][0] if len(paths) > 1 else None

    @property
    def _prev_training_metadata_path(self) -> str | None:
        paths = self._backup_paths()
        return paths[1][1] if len(paths) > 1 else None


def _start_at(model: Any, epoch: int | None) -> None:
    """Make ``model.fit`` begin at ``epoch`` (None: as the caller says), as Keras' own
    BackupAndRestore does: Keras 3 reads ``model._initial_epoch`` after the callbacks'
    train begin, tf_keras its worker training state."""
    if _compat.FLAVOR == "keras3":
        model._initial_epoch = epoch
    else:
        object.__setattr__(model, "_training_state", None if epoch is None else _StartAt(epoch))
