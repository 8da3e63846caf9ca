"""Which Keras is in use, and the few calls that differ between Keras 3 and tf_keras.

``TF_USE_LEGACY_KERAS=1`` selects tf_keras, exactly as it does for ``tf.keras``; the
choice is made once, when :mod:`forge_dist.keras` is first imported.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def legacy_requested() -> bool:
    return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true", "yes")


if legacy_requested():
    import tf_keras as keras  # noqa: F401

    FLAVOR = "tf_keras"
else:
    import keras  # noqa: F401

    FLAVOR = "keras3"
    if not keras.__version__.startswith("3"):  # pragma: no cover - Keras 2 installed as keras
        FLAVOR = "tf_keras"

Callback = keras.callbacks.Callback


def to_float(value: Any) -> float | None:
    """A scalar from ``logs`` as a Python float; None if it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        arr = np.asarray(value)
    except Exception:
        return None
    if arr.shape != () and arr.size != 1:
        return None
    if arr.dtype.kind not in "fiu":
        return None
    return float(arr.reshape(()))


def monitor_op(mode: str) -> Any:
    """Keras' comparison for ``mode``: ``keras.ops.greater``/``less`` (Keras 3), NumPy's
    (tf_keras), as Keras' own callbacks hold in ``monitor_op``."""
    ops = keras.ops if FLAVOR == "keras3" else np
    return ops.greater if mode == "max" else ops.less


def print_msg(message: str) -> None:
    """Print as Keras' callbacks do (``io_utils.print_msg``: stdout, or ``logging`` when
    interactive logging is off)."""
    try:
        if FLAVOR == "keras3":
            from keras.src.utils import io_utils
        else:
            from tf_keras.src.utils import io_utils
    except ImportError:  # pragma: no cover - a Keras without that module
        print(message, flush=True)
        return
    io_utils.print_msg(message)


def has_lr_schedule(optimizer: Any) -> bool:
    """Whether the optimizer's learning rate is a ``LearningRateSchedule`` (which cannot
    be set)."""
    schedule = keras.optimizers.schedules.LearningRateSchedule
    held = getattr(optimizer, "_learning_rate", None)
    if held is None and hasattr(optimizer, "_get_hyper"):  # tf_keras' legacy optimizers
        try:
            held = optimizer._get_hyper("learning_rate")
        except Exception:
            held = None
    return isinstance(held, schedule)


def to_numpy(value: Any) -> np.ndarray:
    """A variable or tensor as a NumPy array (also distributed/mirrored variables)."""
    numpy = getattr(value, "numpy", None)
    if callable(numpy):
        return np.asarray(numpy())
    if FLAVOR == "tf_keras":
        return np.asarray(keras.backend.get_value(value))
    return np.asarray(keras.ops.convert_to_numpy(value))


def get_lr(optimizer: Any) -> float:
    return float(to_numpy(optimizer.learning_rate))


def set_lr(optimizer: Any, value: float) -> None:
    from forge_dist.errors import LearningRateNotSettable

    try:
        optimizer.learning_rate = value
    except (TypeError, ValueError, AttributeError) as e:
        raise LearningRateNotSettable(
            f"cannot set the learning rate of this optimizer ({e}); "
            "SyncReduceLROnPlateau needs a plain float learning rate"
        ) from e


def optimizer_variables(optimizer: Any) -> list[Any]:
    v = optimizer.variables
    return list(v() if callable(v) else v)


def optimizer_built(opt: Any) -> bool:
    built = getattr(opt, "built", None)
    return bool(getattr(opt, "_built", False) if built is None else built)  # tf_keras: _built


def ensure_optimizer_built(model: Any) -> None:
    opt = model.optimizer
    if opt is not None and not optimizer_built(opt):
        opt.build(model.trainable_variables)


def iterations(model: Any) -> int:
    """The optimizer's step count: what names a checkpoint and steps TensorBoard."""
    return int(to_numpy(model.optimizer.iterations))


def metric_direction(model: Any, monitor: str) -> str | None:
    """Keras 3 metrics declare a direction (``"up"``/``"down"``); tf_keras ones do not."""
    name = monitor.removeprefix("val_")
    found: list[Any] = []
    for m in getattr(model, "metrics", []) or []:
        found.append(m)
        found.extend(getattr(m, "metrics", []) or [])
    for m in found:
        if getattr(m, "name", None) == name and getattr(m, "_direction", None) in ("up", "down"):
            return m._direction
    return None


def weights_fingerprint(weights: list[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for w in weights:
        a = np.ascontiguousarray(np.asarray(w))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def keras_fileobj_saver() -> Any:
    """A ``save(model, fileobj)`` that writes a ``.keras`` archive into a writable file
    object, or None where this Keras cannot (Keras 3's saving library takes file objects;
    its public ``model.save`` insists on a path), so the caller saves to a path instead."""
    if FLAVOR != "keras3":
        return None
    try:
        from keras.src.saving import saving_lib
    except ImportError:  # pragma: no cover - a Keras 3 without that module
        return None
    save = getattr(saving_lib, "save_model", None)
    return save if callable(save) else None


def averages_gradients(optimizer: Any) -> bool:
    """The optimizer averages gradients across ranks: forge_dist's DistributedOptimizer,
    or Horovod's (tf_keras)."""
    cls = type(optimizer)
    return bool(getattr(cls, "_forge_dist_wrapped", False)) or cls.__module__.startswith("horovod")
