"""Saving a Keras 3 model without Keras' serializer on the save path.

:class:`StagedLayout` learns, once, where Keras' own saving library puts each variable
in the weight file: it runs Keras' walk over the model (``saving_lib._save_state``, the
code ``model.save`` runs) against a recording store that notes which variable lands at
which ``group/key``. :mod:`.h5stream` then builds that file's skeleton once, and every
save streams the variables' bytes into it:

- a synchronous save streams straight from the variables' own buffers (read-only views,
  no copy) while the loop is held;
- an asynchronous save copies every variable into :class:`HostBuffers`, host arrays
  allocated and touched once and reused by every later save (a plain memory copy: no
  fresh pages, and no copy-on-write for the next optimizer step, since nothing keeps a
  reference to the variables' buffers), and the background writer streams the buffers.

The bytes are the same a Keras save writes (same groups, keys, shapes, dtypes and
values); the archive loads with ``keras.models.load_model``. Models this cannot map —
tf_keras, assets (lookup tables), a ``save_own_variables`` that stores computed arrays,
unusual dtypes — raise :class:`NotStageable` and are saved the usual way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from forge_dist.keras import _compat
from forge_dist.keras.h5stream import DatasetSpec, Skeleton, stream_weights, write_keras_archive

_DTYPES = {"bool", "float16", "float32", "float64"} | {
    f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)
}


class NotStageable(Exception):
    """This model is saved the usual way (the reason says why)."""


class _Tag:
    """What a variable's ``numpy()`` returns while the layout is learned."""

    __slots__ = ("var",)

    def __init__(self, var: Any) -> None:
        self.var = var


def _saving_lib() -> Any:
    if _compat.FLAVOR != "keras3":
        raise NotStageable("tf_keras models are saved by tf_keras")
    try:
        from keras.src.saving import saving_lib
    except ImportError as e:  # pragma: no cover - a Keras 3 without that module
        raise NotStageable(f"this Keras has no saving library to follow: {e}") from e
    for name in ("_save_state", "_serialize_model_as_json", "H5IOStore", "DiskIOStore"):
        if not hasattr(saving_lib, name):  # pragma: no cover - another Keras 3
            raise NotStageable(f"this Keras' saving library has no {name}")
    return saving_lib


def _recorder(saving_lib: Any) -> Any:
    """A weight store that records instead of writing (it passes Keras' type check)."""

    class Recorder(saving_lib.H5IOStore):
        def __init__(self) -> None:  # no file: nothing is written
            self.groups: dict[str, dict[str, Any]] = {}
            self.items: list[tuple[str, str, Any]] = []
            self._group: str | None = None
            self._pending: tuple[str, dict[str, Any]] | None = None

        def __bool__(self) -> bool:
            return True

        def make(self, path: str, metadata: dict[str, Any] | None = None) -> Recorder:
            name = f"{path}/vars" if path else "vars"
            self._group, self._pending = None, (name, dict(metadata or {}))
            if metadata:
                self._open_group()
            return self

        def _open_group(self) -> None:
            assert self._pending is not None
            name, attrs = self._pending
            if name in self.groups:
                raise NotStageable(f"the weight group {name} is written twice")
            self.groups[name] = attrs
            self._group = name

        def __setitem__(self, key: str, value: Any) -> None:
            if self._group is None:
                self._open_group()
            assert self._group is not None
            self.items.append((self._group, str(key), value))

        def close(self) -> None:
            pass

    return Recorder()


@contextlib.contextmanager
def _tagged_numpy(variables: Sequence[Any]) -> Iterator[None]:
    """While learning: ``variable.numpy()`` returns a tag naming the variable (Keras'
    optimizer stores ``variable.numpy()``; layers store the variable itself)."""
    classes = {type(v) for v in variables}
    saved = {c: c.__dict__.get("numpy") for c in classes}
    try:
        for c in classes:
            c.numpy = lambda self: _Tag(self)  # type: ignore[attr-defined]
        yield
    finally:
        for c, original in saved.items():
            if original is None:
                del c.numpy
            else:
                c.numpy = original


def model_variables(model: Any) -> list[Any]:
    """The model's and its optimizer's variables."""
    out = list(model.weights)
    if model.optimizer is not None:
        out += _compat.optimizer_variables(model.optimizer)
    return out


class StagedLayout:
    """Where each of ``model``'s variables goes in its weight file, and the file's
    skeleton. ``variables`` are the sources, in :attr:`datasets` ``source`` order."""

    def __init__(self, model: Any) -> None:
        saving_lib = _saving_lib()
        if model.optimizer is not None:
            _compat.ensure_optimizer_built(model)  # a save before the first step
        candidates = model_variables(model)
        recorder = _recorder(saving_lib)
        assets = saving_lib.DiskIOStore("assets", mode="w")
        try:
            with _tagged_numpy(candidates):
                saving_lib._save_state(
                    model,
                    weights_store=recorder,
                    assets_store=assets,
                    inner_path="",
                    visited_saveables=set(),
                )
            if any(files for _, _, files in os.walk(assets.working_dir)):
                raise NotStageable("the model saves assets (e.g. a lookup table's vocabulary)")
        except NotStageable:
            raise
        except Exception as e:  # a layer whose saving code does more than store variables
            raise NotStageable(f"Keras' walk over the model failed while recorded: {e}") from e
        finally:
            assets.close()
        self.groups = list(recorder.groups.items())
        self.variables, self.datasets = self._map(recorder.items)
        self.skeleton = Skeleton.build(self.groups, self.datasets)
        self._ids = [id(v) for v in model_variables(model)]

    def _map(self, items: list[tuple[str, str, Any]]) -> tuple[list[Any], list[DatasetSpec]]:
        variables: list[Any] = []
        index: dict[int, int] = {}
        datasets = []
        for group, key, value in items:
            var = value.var if isinstance(value, _Tag) else value
            if not hasattr(var, "assign") or not hasattr(var, "dtype"):
                raise NotStageable(f"{group}/{key} is not a variable ({type(value).__name__})")
            name = _dtype_name(var)
            if name not in _DTYPES:
                raise NotStageable(f"{group}/{key} has dtype {name}")
            dtype = np.dtype(name)
            if id(var) not in index:
                index[id(var)] = len(variables)
                variables.append(var)
            shape = tuple(int(d) for d in var.shape)
            datasets.append(DatasetSpec(group, key, index[id(var)], shape, dtype.str))
        return variables, datasets

    def matches(self, model: Any) -> bool:
        """Still the model's variables (not recompiled, rebuilt or replaced)?"""
        return [id(v) for v in model_variables(model)] == self._ids

    def views(self) -> list[np.ndarray]:
        """Read-only views of the variables' current values (no copy)."""
        return [_view(v) for v in self.variables]


def _dtype_name(var: Any) -> str:
    d = var.dtype
    return getattr(d, "name", None) or str(d)


def _view(var: Any) -> np.ndarray:
    """The variable's value as a NumPy array sharing its buffer where TensorFlow allows."""
    value = getattr(var, "value", var)
    read = getattr(value, "read_value", None)
    tensor = read() if callable(read) else value
    return np.asarray(tensor)


class HostBuffers:
    """Host arrays for every variable of a layout: allocated and touched once, then
    reused by every save (the snapshot of an asynchronous save)."""

    def __init__(self, layout: StagedLayout) -> None:
        self.arrays = [np.empty(tuple(v.shape), _dtype_name(v)) for v in layout.variables]
        for a in self.arrays:
            a.fill(0)  # fault every page in now, not in the first save

    def copy_from(self, layout: StagedLayout) -> None:
        for dst, var in zip(self.arrays, layout.variables, strict=True):
            np.copyto(dst, _view(var), casting="no")


def config_and_metadata(model: Any) -> tuple[str, str]:
    """The archive's ``config.json`` and ``metadata.json``, as ``model.save`` writes them
    (the optimizer's config holds the learning rate of this moment)."""
    return _saving_lib()._serialize_model_as_json(model)


def write_model(
    fileobj: Any,
    layout: StagedLayout,
    arrays: Sequence[Any],
    config: tuple[str, str],
    parallel: bool = True,
) -> None:
    """A ``.keras`` archive of ``arrays`` (the layout's sources) into ``fileobj``; with
    ``parallel`` the CRC is computed on a helper thread behind the writes."""
    config_json, metadata_json = config
    write_keras_archive(fileobj, config_json, metadata_json, layout.skeleton, arrays, parallel)


def write_weights(fileobj: Any, layout: StagedLayout, arrays: Sequence[Any]) -> None:
    """A ``.weights.h5`` file of ``arrays`` into ``fileobj``."""
    stream_weights(fileobj.write, layout.skeleton, arrays)
