"""Collectives inside the compiled step, failing in forge_dist's words.

With Horovod, ``DistributedOptimizer`` averages the gradients with an op inside
``model.fit``'s compiled step. When a rank hangs or dies, Horovod shuts down at the
deadline and the step fails with TensorFlow's "Graph execution error ... Horovod has been
shut down", which names neither the deadline nor the collective. Every forge_dist
callback, when Keras hands it the model, makes the model's train function translate that
failure into the communicator's own :class:`~forge_dist.errors.CollectiveTimeoutError`
(``Communicator.in_graph_failure``), as every other collective's failure already is.

Keras builds the train function in ``make_train_function``, between handing the model to
the callbacks and ``on_train_begin`` (Keras 3 and tf_keras alike), and calls
``model.train_function(iterator)`` at every step; the model's ``make_train_function`` is
wrapped so that the function it leaves there is the translating one.
"""

from __future__ import annotations

from typing import Any

from forge_dist.comm import Communicator

_MARK = "_forge_dist_in_graph_watch"


class _Translating:
    """``fn`` that raises the communicator's error for its in-graph failures; every other
    attribute is ``fn``'s (Keras reads some of a tf.function's)."""

    def __init__(self, fn: Any, comm: Communicator) -> None:
        self._fn = fn
        self._comm = comm

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._fn(*args, **kwargs)
        except Exception as e:
            error = self._comm.in_graph_failure(e)
            if error is None:
                raise
            raise error from e

    def __getattr__(self, name: str) -> Any:
        fn = self.__dict__.get("_fn")  # (absent while copy or pickle build the object)
        if fn is None:
            raise AttributeError(name)
        return getattr(fn, name)


def _translating(fn: Any, comm: Communicator) -> Any:
    if fn is None or isinstance(fn, _Translating):
        return fn
    return _Translating(fn, comm)


def watch_train_function(model: Any, comm: Communicator) -> None:
    """From now on ``model``'s train function raises ``comm``'s error when its in-graph
    all-reduce gives up (nothing to do for communicators without one)."""
    if not comm.in_graph_allreduce or comm.size <= 1 or getattr(model, _MARK, False):
        return
    make = model.make_train_function

    def make_train_function(*args: Any, **kwargs: Any) -> Any:
        out = make(*args, **kwargs)  # tf_keras returns it, Keras 3 only sets it
        fn = _translating(out if out is not None else model.train_function, comm)
        object.__setattr__(model, "train_function", fn)
        return fn if out is not None else out

    object.__setattr__(model, "make_train_function", make_train_function)
    object.__setattr__(model, _MARK, True)
    if getattr(model, "train_function", None) is not None:  # a fit of this model ran before
        object.__setattr__(model, "train_function", _translating(model.train_function, comm))
