"""Writing a Keras model into the store: streamed straight into it where Keras can
write to a file object (Keras 3's ``.keras`` archive: hashed as it is written, no
scratch copy, nothing read back), else through a local scratch folder that is always
deleted."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from forge_dist.errors import StorageError
from forge_dist.keras import _compat

MODEL_FILE = "model.keras"
WEIGHTS_FILE = "model.weights.h5"


def payload_name(weights_only: bool) -> str:
    return WEIGHTS_FILE if weights_only else MODEL_FILE


@contextlib.contextmanager
def scratch_save(model: Any, weights_only: bool, prefix: str) -> Iterator[str]:
    """Save ``model`` into a new local scratch folder (never under a checkpoint root);
    yield the file's path; delete the folder afterwards, even on error."""
    scratch = tempfile.mkdtemp(prefix=prefix)
    try:
        path = os.path.join(scratch, payload_name(weights_only))
        try:
            if weights_only:
                model.save_weights(path)
            else:
                model.save(path)
        except OSError as e:
            raise StorageError(f"cannot save the model to local scratch {scratch}: {e}") from e
        yield path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_to_store(
    store: Any,
    step: int,
    model: Any,
    *,
    weights_only: bool,
    metrics: Mapping[str, float],
    state: Mapping[str, Any],
    writer: Mapping[str, Any],
    run: Mapping[str, Any] | None = None,
    lease: Any = None,
) -> None:
    """Commit ``model`` as ``step`` of ``store`` with its metrics, state and writer."""
    stream_save = None if weights_only else _compat.keras_fileobj_saver()
    if stream_save is not None:
        with (
            store.writer(
                step, metrics=metrics, state=state, writer=writer, run=run, lease=lease
            ) as w,
            w.open(MODEL_FILE) as f,
        ):
            stream_save(model, f)
        return
    with (
        scratch_save(model, weights_only, "forge-dist-save-") as path,
        store.writer(step, metrics=metrics, state=state, writer=writer, run=run, lease=lease) as w,
    ):
        w.add_file(os.path.basename(path), path)
