"""Keras' file paths for :class:`~forge_dist.keras.ChiefModelCheckpoint`: which paths
name a file rather than a checkpoint folder, how a template is filled in (Keras'
rules), and a model written into one such file, atomically, with its sidecar
(:mod:`forge_dist.storage.files`)."""

from __future__ import annotations

import shutil
from typing import Any, BinaryIO

from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras.saving import Snapshot, scratch_save
from forge_dist.storage.files import FileTarget

MODEL_SUFFIXES = (".keras", ".h5")
WEIGHTS_SUFFIX = ".weights.h5"


def names_a_file(url: str) -> bool:
    """A Keras file path or name template, not a checkpoint folder."""
    return "{" in url or url.lower().endswith((*MODEL_SUFFIXES, ".hdf5"))


def check_filepath(url: str, weights_only: bool) -> str:
    """Keras 3's rules for ``filepath``, in Keras' words."""
    if weights_only:
        if not url.endswith(WEIGHTS_SUFFIX):
            raise ConfigurationError(
                "When using `save_weights_only=True` in `ChiefModelCheckpoint`, the filepath "
                f"provided must end in `{WEIGHTS_SUFFIX}` (Keras weights format). Received: "
                f"filepath={url}"
            )
    elif not url.endswith(MODEL_SUFFIXES) or url.endswith(WEIGHTS_SUFFIX):
        raise ConfigurationError(
            "The filepath provided must end in `.keras` (Keras model format), or be a "
            "checkpoint folder (no suffix) for forge_dist's resumable steps. Received: "
            f"filepath={url}"
        )
    return url


def format_filepath(template: str, epoch: int, batch: int | None, logs: dict[str, Any]) -> str:
    """Keras' ``ModelCheckpoint._get_file_path``: ``{epoch}`` 1-based, ``{batch}``
    1-based when saving mid-epoch, and any value in ``logs`` (the synced ones)."""
    try:
        if batch is None or "batch" in logs:
            return template.format(epoch=epoch + 1, **logs)
        return template.format(epoch=epoch + 1, batch=batch + 1, **logs)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigurationError(
            f'Failed to format this callback filepath: "{template}". Reason: {e!r} '
            f"(available: epoch, batch, {', '.join(sorted(logs)) or 'no logs'})"
        ) from e


def write_model_file(
    target: FileTarget,
    model: Any,
    weights_only: bool,
    snapshot: Snapshot | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write ``model`` (or ``snapshot``) into ``target`` in the format its name says;
    return the sidecar."""
    name = target.name
    legacy_h5 = not weights_only and not name.endswith(".keras")

    def produce(f: BinaryIO) -> None:
        if snapshot is not None and not legacy_h5:
            snapshot.write(f, weights_only)
            return
        saver = None if weights_only or legacy_h5 else _compat.keras_fileobj_saver()
        if saver is not None:
            saver(model, f)
            return
        with (
            scratch_save(model, weights_only, "forge-dist-file-", name=name) as path,
            open(path, "rb") as src,
        ):
            shutil.copyfileobj(src, f, 8 << 20)

    return target.write(produce, meta)
