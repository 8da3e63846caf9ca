"""Crash safety shown with real SIGKILLs of a writer process at named points."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

import pytest
from conftest import CLOUDS, cloud_target

from forge_dist.storage import CheckpointStore

HERE = os.path.dirname(os.path.abspath(__file__))
POINTS = [
    "file-written:a.bin",
    "file-written:c.bin",
    "before-manifest",
    "manifest-written",  # POSIX: manifest durable, rename not done yet
    "committed",
    "retention-delete:1",
    "deleted:step-00000001",  # step 1 uncommitted, its files still there
    "retention-delete:2",
]
DEADLINE_S = 60


def run_and_kill_at(
    url: str,
    options: dict | None,
    point: str,
    env: dict[str, str],
    script: str = "_crash_writer.py",
) -> None:
    """Start the writer, answer "go" at every point before ``point``, SIGKILL it there."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), url, json.dumps(options or {})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + DEADLINE_S
    seen = []
    try:
        while True:
            if not sel.select(timeout=max(0.0, end - time.monotonic())):
                pytest.fail(f"writer did not reach {point!r} within {DEADLINE_S}s; saw {seen}")
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer exited ({proc.wait()}) before {point!r}; saw {seen}")
            name = line.strip().removeprefix("POINT ")
            seen.append(name)
            if name == point:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=DEADLINE_S) == -signal.SIGKILL
                return
            proc.stdin.write("go\n")
            proc.stdin.flush()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sel.close()


def cli_verify_all(url: str, options: dict | None, env: dict[str, str]) -> int:
    cmd = [os.path.join(os.path.dirname(sys.executable), "forge-dist"), "verify", url, "--all"]
    if options:
        cmd += ["--storage-options", json.dumps(options)]
    return subprocess.run(
        cmd, env={**os.environ, **env}, timeout=DEADLINE_S, capture_output=True
    ).returncode


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("kind", ["local", *CLOUDS])
def test_sigkill_at_every_point_leaves_a_consistent_store(kind, point, tmp_path, request):
    if kind == "local":
        url, options, env = str(tmp_path / "root"), None, {}
    else:
        t = cloud_target(request, kind, "crash-")
        url, env = t.url, {}
        options = {k: v for k, v in (t.options or {}).items() if k != "skip_instance_cache"}
    store = CheckpointStore(url, options)
    for step in (1, 2):
        with store.writer(step, metrics={"val_loss": 1.0 / step}) as w:
            w.add_bytes("a.bin", bytes([step]) * 1000)

    run_and_kill_at(url, options, point, env)

    fresh = CheckpointStore(url, options)
    committed_before_kill = point in ("committed",) or point.startswith(("retention", "deleted"))
    if kind != "local" and point == "manifest-written":
        committed_before_kill = True  # on object stores the manifest PUT is the commit
    newest = fresh.newest(verify="full")
    assert newest is not None
    assert newest.step == (3 if committed_before_kill else 2)
    if point.startswith(("retention", "deleted")):
        assert 1 not in fresh.steps() or point == "retention-delete:1"
    assert cli_verify_all(url, options, env) == 0

    # The next writer succeeds (even for the very step the dead one was writing) ...
    step = 4 if committed_before_kill else 3
    with fresh.writer(step) as w:
        w.add_bytes("a.bin", b"after the crash")
    if kind == "local":
        # On one host a dead writer is known dead: the next commit already tidied up.
        assert fresh.list_staging() == []
    # ... and gc leaves no staging behind.
    fresh.gc(grace_s=0)
    assert fresh.list_staging() == []
    assert fresh.newest(verify="full").step == step
    assert cli_verify_all(url, options, env) == 0
    if kind == "local":
        leftovers = [n for n in os.listdir(url) if not n.startswith("step-") or "." in n]
        assert leftovers == []


ASYNC_POINTS = ["file-written:model.keras", "before-manifest", "manifest-written"]


@pytest.mark.keras
@pytest.mark.parametrize("point", ASYNC_POINTS)
def test_sigkill_during_a_background_save_keeps_the_previous_checkpoint(point, tmp_path):
    """Training with async_save; the process is killed while the background thread writes
    the second checkpoint (the training loop has gone on meanwhile)."""
    pytest.importorskip("keras", reason="Keras is in the [tf] extra")
    url = str(tmp_path / "root")
    run_and_kill_at(url, None, f"16:{point}", {}, script="_crash_async.py")
    store = CheckpointStore(url)
    assert store.steps() == [8]
    assert store.verify(8).ok
    assert cli_verify_all(url, None, {}) == 0


TIER_POINTS = ["copy:16", "file-written:model.keras", "before-manifest", "manifest-written"]


@pytest.mark.keras
@pytest.mark.parametrize("point", [*TIER_POINTS, "durable:16"])
def test_sigkill_between_the_tiers_loses_nothing_durable(point, tmp_path):
    """Two tiers: the process is killed while step 16 is copied from the local root to
    the durable one (training went on meanwhile, committing locally). The durable root
    holds every step that was durable and nothing torn; the local root kept every step
    that was not; a restore on either tier gets the newest it holds."""
    pytest.importorskip("keras", reason="Keras is in the [tf] extra")
    import keras
    from kerashelp import LOCAL

    from forge_dist import keras as fk

    def make_model():  # the child's
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    durable, local = str(tmp_path / "durable"), str(tmp_path / "local")
    env = {"FORGE_TEST_LOCAL_DIR": local}
    run_and_kill_at(durable, None, f"16:{point}", env, script="_crash_async.py")
    d, loc = CheckpointStore(durable), CheckpointStore(local)
    made_durable = [8, 16] if point == "durable:16" else [8]
    assert d.steps() == made_durable
    assert all(d.verify(s).ok for s in d.steps())
    assert cli_verify_all(durable, None, {}) == 0 and cli_verify_all(local, None, {}) == 0
    # local_keep_last=1, yet every step it committed that is not durable is still there.
    newest_local = loc.steps()[-1]
    assert newest_local >= 16
    assert set(loc.steps()) >= set(range(made_durable[-1] + 8, newest_local + 1, 8))
    both = fk.restore_latest(make_model(), durable, communicator=LOCAL, local_directory=local)
    assert both.step == newest_local
    assert fk.restore_latest(make_model(), durable, communicator=LOCAL).step == made_durable[-1]
