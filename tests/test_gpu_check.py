"""benchmarks/gpu_check.py (``make gpu-check``), dry-run on two logical CPU devices: the
demo restores bit for bit under MirroredStrategy and the report holds every figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.py")
pytest.importorskip("tensorflow")


def test_without_a_gpu_it_says_so_and_stops(tmp_path):
    run = subprocess.run(
        [sys.executable, CHECK, "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "sees no GPU" in run.stderr and "--cpu-devices 2" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_on_two_cpu_devices_checks_and_reports(tmp_path):
    run = subprocess.run(
        [sys.executable, CHECK, "--cpu-devices", "2", "--rounds", "2", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["devices"] == ["/cpu:0", "/cpu:1"]
    demo = res["demo"]
    assert demo["ok"] and demo["weights_equal"] and demo["optimizer_equal"]
    assert demo["restored_step"] > 0
    for kind in ("keras", "sync", "async"):
        assert res["save"]["held"][kind] > 0 and math.isfinite(res["save"]["lost"][kind])
    assert res["save"]["async_host_mb"] > 0
    assert res["resume"]["ratios"]["forge_vs_keras_load"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "MirroredStrategy" in md and "/cpu:0, /cpu:1" in md
    assert "`ChiefModelCheckpoint(async_save=True)`: lost per save" in md
    assert "verified `restore_latest`" in md and "weights equal" in md
