"""forge_dist.preemption: the signal flag and the exit code 75 (no TensorFlow). The
Keras side is test_keras_preemption.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from forge_dist.errors import ConfigurationError
from forge_dist.preemption import PREEMPTED_EXIT_CODE, Preempted, SignalFlag, parse_signals

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------- the pure part
def test_preempted_exits_with_75_and_is_not_an_exception():
    stop = Preempted(PREEMPTED_EXIT_CODE, "SIGUSR1", 40, 2, 7)
    assert isinstance(stop, SystemExit) and not isinstance(stop, Exception)
    assert stop.code == 75
    assert "saved step 40 (epoch 3, batch 8)" in str(stop)
    # Uncaught, it ends the process with its code and no traceback.
    code = "from forge_dist.preemption import Preempted; raise Preempted(75, 'SIGTERM', 1, 0, None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 75 and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "bad, message",
    [
        ("SIGNOPE", "not a signal"),
        ("KILL", "cannot be caught"),
        ([], "at least one"),
        (True, "not a signal"),
    ],
)
def test_bad_signals_are_refused(bad, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_signals(bad)


def test_signal_flag_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR2)
    flag = SignalFlag(["USR2", signal.SIGUSR1])
    flag.install()
    try:
        assert not flag.raised
        os.kill(os.getpid(), signal.SIGUSR2)  # delivered before kill() returns to Python
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.received == signal.SIGUSR2
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == before
