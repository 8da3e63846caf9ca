"""AsyncCheckpointer on its own: one save at a time, errors kept and raised once."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from forge_dist.errors import ForgeDistError  # noqa: E402
from forge_dist.keras import AsyncCheckpointer  # noqa: E402

BOUND_S = 30


def test_a_save_runs_behind_the_caller_and_wait_until_finished_joins_it():
    release, ran = threading.Event(), []
    ac = AsyncCheckpointer()
    ac.save(lambda: (release.wait(BOUND_S), ran.append(1)), "step 1")
    assert ac.busy and ran == []
    release.set()
    ac.wait_until_finished()
    assert not ac.busy and ran == [1]
    ac.check_for_errors()  # nothing failed


def test_one_save_at_a_time():
    release = threading.Event()
    ac = AsyncCheckpointer()
    ac.save(lambda: release.wait(BOUND_S), "step 1")
    try:
        with pytest.raises(RuntimeError, match="already running"):
            ac.save(lambda: None, "step 2")
    finally:
        release.set()
        ac.wait_until_finished()


def test_a_failure_is_raised_once_and_names_the_save():
    ac = AsyncCheckpointer()

    def fail() -> None:
        raise OSError(28, "No space left on device")

    ac.save(fail, "step 7")
    ac.wait_until_finished()
    with pytest.raises(ForgeDistError, match="step 7 failed: .*No space") as info:
        ac.check_for_errors()
    assert isinstance(info.value.__cause__, OSError)
    ac.check_for_errors()  # raised once: the next save starts clean


def test_a_running_save_is_not_reported_before_it_ends():
    release = threading.Event()
    ac = AsyncCheckpointer()

    def fail_later() -> None:
        release.wait(BOUND_S)
        raise ValueError("late")

    ac.save(fail_later, "step 3")
    ac.check_for_errors()  # still running: nothing to raise yet
    release.set()
    ac.wait_until_finished()
    with pytest.raises(ForgeDistError, match="late"):
        ac.check_for_errors()


def test_the_thread_is_not_a_daemon():
    """Interpreter exit waits for a save in flight (tested end to end in
    test_keras_async_checkpoint.py)."""
    release = threading.Event()
    ac = AsyncCheckpointer()
    ac.save(lambda: release.wait(BOUND_S), "step 1")
    try:
        saving = [t for t in threading.enumerate() if t.name == "forge-dist-save step 1"]
        assert len(saving) == 1 and not saving[0].daemon
    finally:
        release.set()
        ac.wait_until_finished()
