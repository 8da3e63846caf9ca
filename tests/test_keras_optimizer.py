"""DistributedOptimizer in one process (gradient averaging across ranks: test_e2e_*.py)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import (  # noqa: E402
    ConfigurationError,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def test_distributed_optimizer_refuses_double_wrapping():
    opt = fk.DistributedOptimizer(keras.optimizers.SGD(0.1), communicator=LOCAL)
    with pytest.raises(ConfigurationError, match="already"):
        fk.DistributedOptimizer(opt, communicator=LOCAL)
