"""Writing a Keras model into the store.

Three ways, fastest first: a :class:`Snapshot` (Keras 3: the weight file's layout
learned once, the variables' bytes streamed into the store, see :mod:`.staged`); Keras
3's own saver writing into the store's file object (hashed as it is written, no scratch
copy); else through a local scratch folder that is always deleted."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from forge_dist.errors import StorageError
from forge_dist.keras import _compat, staged

MODEL_FILE = "model.keras"
WEIGHTS_FILE = "model.weights.h5"


def payload_name(weights_only: bool) -> str:
    return WEIGHTS_FILE if weights_only else MODEL_FILE


@contextlib.contextmanager
def scratch_save(
    model: Any, weights_only: bool, prefix: str, name: str | None = None
) -> Iterator[str]:
    """Save ``model`` into a new local scratch folder (never under a checkpoint root),
    as ``name`` (its suffix chooses Keras' format; default: the payload's name); yield
    the file's path; delete the folder afterwards, even on error."""
    scratch = tempfile.mkdtemp(prefix=prefix)
    try:
        path = os.path.join(scratch, name or payload_name(weights_only))
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


@dataclass
class Snapshot:
    """What a save writes when the layout is known: the variables' bytes (views of the
    live variables, or host buffers) and the archive's config at the save point.

    ``parallel``: hash and CRC on helper threads behind the writes (a synchronous save,
    with the loop held and every core free); else all on the writing thread (a
    background save, which should take no more than the one core training leaves)."""

    layout: staged.StagedLayout
    arrays: Sequence[Any]
    config: tuple[str, str]
    parallel: bool = True

    def write(self, f: Any, weights_only: bool) -> None:
        if weights_only:
            staged.write_weights(f, self.layout, self.arrays)
        else:
            staged.write_model(f, self.layout, self.arrays, self.config, self.parallel)


class StagedSaves:
    """One checkpoint callback's fast path: the layout (learned at the first save and
    again when the model's variables change) and, for asynchronous saves, the host
    buffers reused by every snapshot. ``why_not`` says why a model takes the usual way."""

    def __init__(self) -> None:
        self._layout: staged.StagedLayout | None = None
        self._buffers: staged.HostBuffers | None = None
        self._refused: list[int] | None = None  # the variables a layout was refused for
        self.why_not: str | None = None

    def layout(self, model: Any) -> staged.StagedLayout | None:
        if self._layout is not None and self._layout.matches(model):
            return self._layout
        ids = [id(v) for v in staged.model_variables(model)]
        if self._refused == ids:
            return None
        self._layout, self._buffers = None, None
        try:
            self._layout = staged.StagedLayout(model)
        except staged.NotStageable as e:
            self._refused, self.why_not = ids, str(e)
            return None
        self._refused = self.why_not = None
        return self._layout

    def live(self, model: Any) -> Snapshot | None:
        """The variables as they are (the loop is held while this is written)."""
        layout = self.layout(model)
        if layout is None:
            return None
        return Snapshot(layout, layout.views(), staged.config_and_metadata(model))

    @property
    def host_bytes(self) -> int:
        """Host memory the asynchronous saves' buffers hold (0 before the first)."""
        return 0 if self._buffers is None else sum(a.nbytes for a in self._buffers.arrays)

    def copy(self, model: Any) -> Snapshot | None:
        """The variables copied into the host buffers (training may go on)."""
        layout = self.layout(model)
        if layout is None:
            return None
        if self._buffers is None:
            self._buffers = staged.HostBuffers(layout)
        self._buffers.copy_from(layout)
        config = staged.config_and_metadata(model)
        return Snapshot(layout, self._buffers.arrays, config, parallel=False)


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
    snapshot: Snapshot | None = None,
    replace: bool = False,
) -> None:
    """Commit ``snapshot`` (else ``model``) as ``step`` of ``store`` with its metrics,
    state and writer (``replace``: over a committed step of that number)."""

    def step_writer() -> Any:
        return store.writer(
            step, metrics=metrics, state=state, writer=writer, run=run, lease=lease, replace=replace
        )

    if snapshot is not None:
        with (
            step_writer() as w,
            w.open(payload_name(weights_only), hash_behind=snapshot.parallel) as f,
        ):
            snapshot.write(f, weights_only)  # (the arrays stay as they are until closed)
        return
    stream_save = None if weights_only else _compat.keras_fileobj_saver()
    if stream_save is not None:
        with step_writer() as w, w.open(MODEL_FILE) as f:
            stream_save(model, f)
        return
    with scratch_save(model, weights_only, "forge-dist-save-") as path, step_writer() as w:
        w.add_file(os.path.basename(path), path)
