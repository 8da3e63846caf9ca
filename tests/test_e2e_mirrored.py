"""MirroredStrategy over two logical CPUs, Keras 3 and tf_keras, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")


HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_mirrored_strategy_over_two_logical_cpus(tmp_path, flavor):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if flavor == "tf_keras":
        env["TF_USE_LEGACY_KERAS"] = "1"
    root = str(tmp_path / "m")
    script = os.path.join(HERE, "_mirrored_train.py")
    runs = []
    for _ in range(2):  # train, then resume: nothing left to do, same weights
        out = subprocess.run(
            [sys.executable, script, root], env=env, capture_output=True, text=True, timeout=240
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["backend"] == "tf" and first["replicas"] == 2 and first["flavor"] == flavor
    assert first["epochs"] == 3
    assert second["initial_epoch"] == 3 and second["fingerprint"] == first["fingerprint"]
    forge = os.path.join(os.path.dirname(sys.executable), "forge-dist")
    assert subprocess.run([forge, "verify", root, "--all"], timeout=60).returncode == 0
