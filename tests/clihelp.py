"""Running the ``forge-dist`` command from tests, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    proc = subprocess.run(
        [FORGE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc


def one_clear_line(proc) -> str:
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("forge-dist: error: ")
    return err


def make_root(target, steps=(1, 2), payload=b"payload"):
    store = target.store()
    for s in steps:
        with store.writer(s, metrics={"val_loss": 1.0 / s, "acc": 0.5 + s / 10}) as w:
            w.add_bytes("model.bin", payload * s)
            w.add_bytes("sub/opt.bin", b"o" * s)
    return store


def opts(target) -> list[str]:
    return ["--storage-options", json.dumps(target.options)] if target.options else []
