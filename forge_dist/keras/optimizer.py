"""``DistributedOptimizer``: gradients averaged across ranks inside ``model.fit``.

The wrapper is a dynamic subclass of the user's optimizer class (named like it, so a
saved ``.keras`` file loads back as the plain optimizer). Before the parent applies the
gradients, it flattens them into one float32 buffer, averages that buffer across ranks
in one host call (``tf.numpy_function`` around the communicator's all-reduce), and
splits it back: one collective per step, not one per variable.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from forge_dist.comm import Communicator, get_communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras import _compat
from forge_dist.keras.callbacks.base import check_keras_supports


def _average_fn(comm: Communicator) -> Any:
    def average(flat: np.ndarray) -> np.ndarray:
        out = comm.allreduce(flat, op="mean", name="DistributedOptimizer(gradients)")
        return out.astype(np.float32)

    return average


def _averaged(
    grads: list[Any], average: Any, in_graph: Any = None, compression: str = "none"
) -> list[Any]:
    import tensorflow as tf

    present = [(i, g) for i, g in enumerate(grads) if g is not None]
    if not present:
        return list(grads)
    dense = [tf.convert_to_tensor(g) for _, g in present]
    flat = tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in dense], axis=0)
    if in_graph is not None:
        reduced = in_graph(flat)
    else:
        if compression == "fp16":  # halve the bytes on the wire; the sum is in float64
            flat = tf.cast(tf.cast(flat, tf.float16), tf.float32)
        reduced = tf.numpy_function(average, [flat], tf.float32, stateful=True)
    reduced.set_shape(flat.shape)
    sizes = [tf.size(g) for g in dense]
    parts = tf.split(reduced, sizes)
    out = list(grads)
    for (i, g), part in zip(present, parts, strict=True):
        out[i] = tf.cast(tf.reshape(part, tf.shape(g)), g.dtype)
    return out


def DistributedOptimizer(  # noqa: N802
    optimizer: Any, communicator: Communicator | None = None, compression: str = "none"
) -> Any:
    """A copy of ``optimizer`` (same class and config) that averages gradients across
    ranks before applying them. With a single rank it is the plain optimizer.

    Where the communicator has an in-graph all-reduce (Horovod's) the average is an op
    inside the compiled step; otherwise one host call per step through the communicator.
    ``compression="fp16"`` sends gradients as float16 (Horovod's fp16 compression)."""
    comm = communicator if communicator is not None else get_communicator("auto")
    check_keras_supports(comm)
    if comm.averages_gradients:
        return optimizer  # the tf.distribute strategy averages gradients itself
    if compression not in ("none", "fp16"):
        raise ConfigurationError(f"compression must be 'none' or 'fp16', got {compression!r}")
    in_graph = (
        functools.partial(comm.graph_allreduce_mean, compression=compression)
        if comm.in_graph_allreduce
        else None
    )

    base = type(optimizer)
    if getattr(base, "_forge_dist_wrapped", False):
        raise ConfigurationError("this optimizer is already a DistributedOptimizer")
    if not hasattr(optimizer, "get_config"):
        raise ConfigurationError(f"expected a Keras optimizer, got {type(optimizer).__name__}")
    average = _average_fn(comm)

    if _compat.FLAVOR == "keras3":

        def apply(self: Any, grads: Any, trainable_variables: Any = None) -> Any:
            if comm.size > 1:
                grads = _averaged(list(grads), average, in_graph, compression)
            return base.apply(self, grads, trainable_variables)

        methods = {"apply": apply}
    else:

        def apply_gradients(self: Any, grads_and_vars: Any, *args: Any, **kwargs: Any) -> Any:
            pairs = list(grads_and_vars)
            if comm.size > 1 and pairs:
                grads = _averaged([g for g, _ in pairs], average, in_graph, compression)
                pairs = list(zip(grads, [v for _, v in pairs], strict=True))
            return base.apply_gradients(self, pairs, *args, **kwargs)

        methods = {"apply_gradients": apply_gradients}

    cls = type(
        base.__name__,
        (base,),
        {
            **methods,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "_forge_dist_wrapped": True,
            "_forge_dist_comm": comm,
            "_forge_dist_average": staticmethod(average),
        },
    )
    return cls.from_config(optimizer.get_config())
