"""DistributedOptimizer in one process (gradient averaging across ranks: test_e2e_*.py)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.comm import LocalCommunicator  # noqa: E402
from forge_dist.errors import CollectiveTimeoutError, ConfigurationError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_distributed_optimizer_refuses_double_wrapping():
    opt = fk.DistributedOptimizer(keras.optimizers.SGD(0.1), communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="already"):
        fk.DistributedOptimizer(opt, communicator=LOCAL)


class InGraphComm(LocalCommunicator):
    """One process posing as rank 0 of 2 with an in-graph all-reduce that gives up at a
    chosen step, as Horovod's does when a rank hangs past the deadline."""

    in_graph_allreduce = True

    def __init__(self, fail_at_call):
        super().__init__()
        self.calls, self.fail_at_call = 0, fail_at_call

    @property
    def size(self):
        return 2

    def graph_allreduce_mean(self, tensor, compression="none"):
        import tensorflow as tf

        def reduce(x):
            self.calls += 1
            if self.calls == self.fail_at_call:
                raise RuntimeError("Horovod has been shut down. This was caused by ...")
            return x

        return tf.numpy_function(reduce, [tensor], tf.float32, stateful=True)

    def in_graph_failure(self, error):
        if "Horovod has been shut down" not in str(error):
            return None
        return CollectiveTimeoutError(f"'DistributedOptimizer(gradients)' gave up: {error}")


@pytest.mark.parametrize("before", [None, "forge", "plain"])
def test_an_in_graph_all_reduce_that_gives_up_is_the_communicators_error(before):
    """Translated in a model's first fit, in a later one, and in a fit that follows one
    without forge_dist callbacks (its train function was built already)."""
    from kerashelp import X, Y

    fits_before = 0 if before is None else 1
    comm = InGraphComm(fail_at_call=4 * fits_before + 3)  # the 3rd step of the last fit
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=fk.DistributedOptimizer(keras.optimizers.SGD(0.1), comm), loss="mse")
    fit = dict(batch_size=32, epochs=1, verbose=0)
    if before is not None:
        first = [fk.SyncTerminateOnNaN(communicator=comm)] if before == "forge" else []
        model.fit(X, Y, callbacks=first, **fit)
    with pytest.raises(CollectiveTimeoutError, match="DistributedOptimizer") as info:
        model.fit(X, Y, callbacks=[fk.SyncTerminateOnNaN(communicator=comm)], **fit)
    assert "Horovod has been shut down" in str(info.value)  # what it translated
    assert comm.calls == 4 * fits_before + 3
    comm.fail_at_call = None  # other failures are Keras' own, untouched
    with pytest.raises(Exception, match="Matrix size-incompatible") as other:
        model.fit(X[:, :3], Y, callbacks=[fk.SyncTerminateOnNaN(communicator=comm)], **fit)
    assert not isinstance(other.value, CollectiveTimeoutError)


def test_the_translating_train_function_copies_and_reads_as_the_original():
    import copy

    from forge_dist.keras.in_graph import _Translating

    def step(x):
        return x + 1

    step.answer = 42
    wrapped = _Translating(step, InGraphComm(None))
    assert wrapped(1) == 2 and wrapped.answer == 42
    assert copy.copy(wrapped)(1) == 2  # (no endless __getattr__ while copy builds it)
