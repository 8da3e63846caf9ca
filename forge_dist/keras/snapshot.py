"""``HostTwin``: the snapshot an asynchronous save writes.

A copy of the model's architecture in host memory, with a plain optimizer of the same
class and config, built once; :meth:`HostTwin.copy_from_live` assigns every model and
optimizer variable from the live model at the save point (TensorFlow copies a buffer
on write, so this is quick and allocates nothing after the first save).
"""

from __future__ import annotations

from typing import Any

from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat


class HostTwin:
    """A copy of ``model``'s architecture in host memory, with a plain optimizer of the
    same class and config, built once; ``copy_from_live()`` assigns every model and
    optimizer variable from the live model: what a background save writes."""

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        keras = _compat.keras
        if model.optimizer is not None:
            _compat.ensure_optimizer_built(model)  # a save before the first step
        with tf.device("/cpu:0"):
            try:
                twin = keras.models.clone_model(model)
            except Exception as e:
                raise ConfigurationError(
                    f"async_save needs a model keras.models.clone_model can copy: {e}"
                ) from e
            opt = model.optimizer
            if opt is not None:
                config = (
                    model.get_compile_config() if hasattr(model, "get_compile_config") else None
                )
                if config:
                    twin.compile_from_config(config)  # the same loss, metrics, optimizer
                else:
                    wrapped = getattr(type(opt), "_forge_dist_wrapped", False)
                    cls = type(opt).__mro__[1] if wrapped else type(opt)
                    twin.compile(optimizer=cls.from_config(opt.get_config()), loss=model.loss)
                _compat.ensure_optimizer_built(twin)
        self.model = twin
        self.pairs = list(zip(twin.weights, model.weights, strict=False))
        if len(twin.weights) != len(model.weights):
            raise ConfigurationError("async_save: the model's copy has other variables")
        if opt is not None:
            mine = _compat.optimizer_variables(opt)
            theirs = _compat.optimizer_variables(twin.optimizer)
            if len(mine) != len(theirs):
                raise ConfigurationError(
                    f"async_save could not rebuild the optimizer ({len(theirs)} variables, "
                    f"not {len(mine)})"
                )
            self.pairs += list(zip(theirs, mine, strict=True))
        for dst, src in self.pairs:
            if tuple(dst.shape) != tuple(src.shape):
                raise ConfigurationError(
                    f"async_save: {dst.path if hasattr(dst, 'path') else dst.name} has shape "
                    f"{tuple(dst.shape)} in the copy, {tuple(src.shape)} in the model"
                )

    def copy_from_live(self) -> None:
        for dst, src in self.pairs:
            dst.assign(src)
