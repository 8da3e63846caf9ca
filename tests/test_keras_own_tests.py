"""Keras' own tests of a callback (the installed Keras' ``keras/src/callbacks/*_test.py``),
run in one process with forge_dist's counterpart in place of Keras' class
(``_keras_swap.py``): the semantics Keras pins are the ones users get."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")
HERE = os.path.dirname(os.path.abspath(__file__))

#: Keras' class -> its test module (those that pass with forge_dist's counterpart).
KERAS_TESTS = {"CSVLogger": "csv_logger_test.py"}


@pytest.mark.parametrize("name", sorted(KERAS_TESTS))
def test_kerass_own_tests_pass_with_forge_dists_counterpart(tmp_path, name):
    path = os.path.join(os.path.dirname(keras.__file__), "src", "callbacks", KERAS_TESTS[name])
    if not os.path.exists(path):
        pytest.skip(f"this Keras wheel ships no {KERAS_TESTS[name]}")
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\nmarkers =\n    requires_trainable_backend\n")
    count = tmp_path / "made"
    env = dict(
        os.environ,
        PYTHONPATH=HERE,
        FORGE_SWAP=name,
        FORGE_SWAP_COUNT=str(count),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    cmd = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tmp_path)]
    cmd += ["-p", "_keras_swap", "-p", "no:cacheprovider", "-q", "-rfEs", path]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:]
    assert " skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]
    assert int(count.read_text()) > 0, "Keras' tests never built forge_dist's class"
