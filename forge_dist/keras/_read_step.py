"""A committed step's weights and optimizer values, every byte verified as read: in
place where the model allows it, else downloaded and loaded by Keras."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras.callbacks.broadcast import optimizer_values
from forge_dist.keras.saving import MODEL_FILE, WEIGHTS_FILE

log = logging.getLogger("forge_dist.keras")


def load_payload(path: str, weights_only: bool, model: Any, custom_objects: Any) -> tuple:
    """``(weights, optimizer values)`` from a saved file; a weights file is loaded into
    ``model`` itself, a ``.keras`` archive into a new model."""
    if weights_only:
        if model.optimizer is not None:
            _compat.ensure_optimizer_built(model)  # so saved optimizer variables load too
        model.load_weights(path)
        return model.get_weights(), optimizer_values(model) if model.optimizer else None
    loaded = _compat.keras.models.load_model(path, custom_objects=custom_objects, compile=True)
    opt_values = optimizer_values(loaded) if getattr(loaded, "optimizer", None) else []
    return loaded.get_weights(), opt_values or None


def fetch(store: Any, info: Any, model: Any, custom_objects: Any) -> tuple:
    """``(weights, optimizer values)`` of the step ``info`` lists, every byte verified as
    it is read:
    in place where it can be (:func:`fetch_in_place`), else downloaded to local scratch
    (verified while copied) and loaded."""
    in_place = fetch_in_place(store, info, model)
    if in_place is not None:
        return in_place
    step = info.step
    scratch = tempfile.mkdtemp(prefix="forge-dist-restore-")
    try:
        dest = store.download(step, os.path.join(scratch, "ckpt"))
        for name, weights_only in ((MODEL_FILE, False), (WEIGHTS_FILE, True)):
            if os.path.exists(os.path.join(dest, name)):
                return load_payload(os.path.join(dest, name), weights_only, model, custom_objects)
        raise ConfigurationError(f"step {step} holds neither {MODEL_FILE} nor {WEIGHTS_FILE}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fetch_in_place(store: Any, info: Any, model: Any, direct: bool = True) -> tuple | None:
    """Keras 3: the step's one file read once into memory, hashed while read, and its
    datasets taken as arrays where they lie (found through the layout Keras' own saving
    walk gives ``model``): no temporary copy and no second model. None where the model
    or the file does not allow it (then the caller loads it the usual way).
    ``direct=False``: a local file through the page cache, for ranks reading it at once."""
    from forge_dist.keras import h5read, staged

    files = [e.path for e in info.manifest.files] if info.manifest else []
    if files not in ([MODEL_FILE], [WEIGHTS_FILE]):
        return None
    try:
        layout = staged.StagedLayout(model)
    except staged.NotStageable as e:
        log.debug("restoring %s the usual way: %s", info.name, e)
        return None
    buf = store.read_verified(info, files[0], direct)  # (the manifest as listed, not again)
    try:
        arrays = h5read.arrays_in_place(
            buf, files[0] == MODEL_FILE, layout.datasets, len(layout.variables)
        )
    except h5read.NotInPlace as e:
        log.debug("restoring %s the usual way: %s", info.name, e)
        return None
    found = {id(v): a for v, a in zip(layout.variables, arrays, strict=True)}
    optimizer = _compat.optimizer_variables(model.optimizer) if model.optimizer else []
    wanted = list(model.weights) + list(optimizer)
    if any(id(v) not in found for v in wanted):
        log.debug("restoring %s the usual way: a variable is not in its file", info.name)
        return None
    weights = [found[id(v)] for v in model.weights]
    return weights, [found[id(v)] for v in optimizer] or None
