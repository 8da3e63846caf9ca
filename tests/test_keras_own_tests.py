"""Keras' own tests of a callback (the installed Keras' ``keras/src/callbacks/*_test.py``),
run in one process with forge_dist's counterpart in place of Keras' class
(``_keras_swap.py``): the semantics Keras pins are the ones users get."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")
HERE = os.path.dirname(os.path.abspath(__file__))

#: Keras' class -> its test module.
KERAS_TESTS = {
    "BackupAndRestore": "backup_and_restore_test.py",
    "CSVLogger": "csv_logger_test.py",
    "EarlyStopping": "early_stopping_test.py",
    "ModelCheckpoint": "model_checkpoint_test.py",
    "ReduceLROnPlateau": "reduce_lr_on_plateau_test.py",
    "TerminateOnNaN": "terminate_on_nan_test.py",
}

#: Keras' tests that fail on a deliberate difference (README, "Where forge_dist differs
#: from Keras"), and the error they must fail with: nothing else may fail.
DELIBERATE = {
    # Its case 5 monitors "unknown", which Keras warns about and then saves every epoch
    # ("best" becomes "last"); forge_dist refuses a monitor the logs lack (its case 6, an
    # unknown mode, is refused too). Cases 1-4 ran before it (pass); the later cases
    # (save_freq, templates, initial_value_threshold) are in test_keras_files.py.
    ("ModelCheckpoint", "test_model_checkpoint_options"): ("monitor 'unknown' is not in the logs"),
}


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
    cmd += ["-p", "_keras_swap", "-p", "no:cacheprovider", "-q", "-rfEs", "--tb=line", path]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    failed = set(re.findall(r"^FAILED \S+::\w+::(\w+)", out.stdout, re.M))
    expected = {test for (cls, test) in DELIBERATE if cls == name}
    assert failed == expected, out.stdout[-4000:]
    for test in expected:
        assert DELIBERATE[(name, test)] in out.stdout, out.stdout[-4000:]
    assert " skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]
    assert " passed" in out.stdout.splitlines()[-1], out.stdout[-2000:]
    assert int(count.read_text()) > 0, "Keras' tests never built forge_dist's class"
