"""Checks made at train begin, before the first step: is there room for what the
checkpoint policy will keep? (The chief checks; :func:`forge_dist.comm.agree` tells
every rank.)"""

from __future__ import annotations

import math
from typing import Any

from forge_dist._units import human_bytes
from forge_dist.errors import StorageError
from forge_dist.keras import _compat

#: A .keras archive holds the variables plus config and zip overhead.
ARCHIVE_OVERHEAD = 1.02
ARCHIVE_EXTRA_BYTES = 64 * 1024


#: Slots per trainable variable assumed for an optimizer not built yet (Adam's two).
UNBUILT_SLOTS = 2


def _bytes(variables: list[Any]) -> int:
    return sum(int(math.prod(tuple(v.shape))) * _itemsize(v.dtype) for v in variables)


def state_bytes(model: Any) -> int:
    """Bytes of the model's and optimizer's variables (an optimizer that is not built
    yet is counted as Adam's two slots per trainable variable)."""
    total = _bytes(list(model.weights))
    opt = model.optimizer
    if opt is not None:
        total += _bytes(_compat.optimizer_variables(opt))
        if not _compat.optimizer_built(opt):
            total += UNBUILT_SLOTS * _bytes(list(model.trainable_weights))
    return total


def _itemsize(dtype: Any) -> int:
    import numpy as np

    try:
        return int(np.dtype(getattr(dtype, "name", dtype)).itemsize)
    except TypeError:
        return 4  # an unusual dtype: counted as float32


def checkpoint_bytes(model: Any) -> int:
    """An estimate of one checkpoint's size on storage."""
    return int(state_bytes(model) * ARCHIVE_OVERHEAD) + ARCHIVE_EXTRA_BYTES


def memory_available() -> int | None:
    """Linux's MemAvailable, in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_room(
    store: Any,
    model: Any,
    retention: Any,
    async_save: bool,
    infos: list[Any],
) -> None:
    """Chief: the root (already probed writable; ``infos`` is its listing) has room for
    what retention keeps plus one, and (async saves) the host has memory for the twin.
    One :class:`StorageError` naming the URL, the need and what is free."""
    one = checkpoint_bytes(model)
    n = retention.most_kept + 1  # what retention holds at most, and the one being written
    free = store.free_bytes()
    if free is not None:
        present = sum(c.manifest.total_bytes for c in infos if c.manifest is not None)
        need = max(0, n * one - present)
        if free < need:
            raise StorageError(
                f"checkpoint root {store.display} has {human_bytes(free)} free, but keeping "
                f"{n - 1} checkpoint(s) of about {human_bytes(one)} ({retention}) while "
                "writing the next needs about "
                f"{human_bytes(need)} more; "
                "free space, keep fewer, or choose another root"
            )
    if async_save:
        available = memory_available()
        if available is not None and available < state_bytes(model):
            raise StorageError(
                f"async_save keeps a copy of the model and optimizer state in host memory "
                f"(about {human_bytes(state_bytes(model))}) but only {human_bytes(available)} is "
                "available; use async_save=False"
            )
