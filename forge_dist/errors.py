"""The exceptions forge_dist raises.

Every error derives from :class:`ForgeDistError` and also from the built-in it
refines, so ``except ValueError`` keeps working for callers who do not know us.
"""

from __future__ import annotations


class ForgeDistError(Exception):
    """Root of every error raised by forge_dist."""


class ConfigurationError(ForgeDistError, ValueError):
    """A bad argument or setting; raised at construction, on every rank."""


class LearningRateNotSettable(ConfigurationError, TypeError):
    """The optimizer's learning rate cannot be set (a ``LearningRateSchedule``): a
    ``TypeError``, as Keras raises it, and a configuration error."""


class NonFiniteLossError(ForgeDistError, RuntimeError):
    """A NaN or infinite loss on some rank, with ``SyncTerminateOnNaN(raise_error=True)``:
    raised on every rank (a ``RuntimeError``, as Keras' ``TerminateOnNaN`` raises)."""


class BackendNotInstalledError(ForgeDistError, ImportError):
    """A storage or communication backend needs an optional extra."""


class ManifestError(ForgeDistError, ValueError):
    """A manifest that cannot be parsed or breaks the format's rules."""


class UnsafePathError(ManifestError):
    """A file path that could escape the checkpoint folder."""


class StorageError(ForgeDistError, OSError):
    """An I/O, permission or credential problem with the checkpoint root."""


class NoCheckpointError(StorageError, FileNotFoundError):
    """There is no committed checkpoint where one was asked for."""


class CheckpointExistsError(StorageError, FileExistsError):
    """Saving would overwrite a committed checkpoint without ``replace=True``."""


class StaleWriterError(StorageError):
    """A newer writer generation took over the checkpoint root (a requeued attempt, a
    new run): this writer may no longer commit or delete there."""


class IntegrityError(ForgeDistError, ValueError):
    """A committed checkpoint whose files do not match its manifest."""

    def __init__(self, message: str, problems: list | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class CollectiveTimeoutError(ForgeDistError, TimeoutError):
    """A collective did not complete before its deadline: a rank died, hung or took
    another code path. Raised on every surviving rank that waits for it."""

    def __init__(self, message: str, operation: str = "", missing: list[int] | None = None):
        super().__init__(message)
        self.operation = operation
        self.missing = list(missing or [])


class RankFailedError(ForgeDistError, RuntimeError):
    """Another rank raised an error outside any collective (a bad argument on that rank
    alone, a failed data load) and said so before exiting: raised on every rank waiting
    for it, at once, naming that rank and its error."""


class CollectiveMismatchError(ForgeDistError, RuntimeError):
    """Ranks called different collectives or passed incompatible data (e.g. different
    metric names). Raised on every rank, never on just one."""
