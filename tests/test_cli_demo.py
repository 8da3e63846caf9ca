"""``forge-dist demo``: the main job, as a user runs it."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
from multiproc import mpi_env, need_mpi, run_bounded

from forge_dist.storage import CheckpointStore

pytestmark = pytest.mark.keras
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")


@pytest.mark.mpi
def test_demo_trains_two_processes_and_verifies(tmp_path):
    need_mpi()
    root = tmp_path / "demo"
    run = run_bounded([FORGE, "demo", "--url", str(root)], mpi_env(), bound_s=300)
    assert run.returncode == 0, run.output[-3000:]
    out = run.output
    assert "2 processes under mpirun" in out
    # One line per epoch, its val_loss the synced value the CSV holds (4 decimals).
    printed = re.findall(r"epoch +(\d+)/30 .*? val_loss (\d+\.\d{4}) \(mean of 2 ranks", out)
    with open(root / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(e) for e, _ in printed] == [int(r["epoch"]) + 1 for r in rows]
    assert [v for _, v in printed] == [f"{float(r['val_loss']):.4f}" for r in rows]
    assert "summary: 2 rank(s)" in out and "all verified" in out
    # The guard compared the ranks' weights after every epoch, and found them equal.
    assert f"weights identical across ranks at {len(rows)} check(s)" in out
    store = CheckpointStore(str(root))
    assert store.list() and all(store.verify(c.name).ok for c in store.list())
    # The printed best epoch is what the kept best checkpoint says.
    best = store.best("val_loss", "min")
    assert f"best epoch {best.state['epoch'] + 1} " in out


def test_demo_falls_back_to_mirrored_strategy(tmp_path):
    root = tmp_path / "demo"
    run = run_bounded(
        [FORGE, "demo", "--strategy", "--url", str(root), "--epochs", "3"],
        dict(os.environ),
        bound_s=300,
    )
    assert run.returncode == 0, run.output[-3000:]
    assert "MirroredStrategy over 2 logical CPUs" in run.output
    assert "summary: 1 rank(s), 2 replica(s)" in run.output and "all verified" in run.output


def test_fresh_never_deletes_files_it_did_not_write(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    out = subprocess.run(
        [FORGE, "demo", "--fresh", "--url", str(root)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "refuses to clear" in out.stderr
    assert (root / "thesis.tex").read_text() == "precious"


def test_the_summary_says_when_the_guard_found_weights_apart():
    from forge_dist.cli.demo import _summary_line

    summary = {
        "ranks": 2,
        "replicas": 2,
        "epochs_run": 5,
        "stopped_early": False,
        "best_epoch": 4,
        "best_val_loss": 0.25,
        "final_lr": 0.001,
        "checkpoints_committed": 5,
        "guard_checks": 5,
        "guard_mismatches": 0,
    }
    assert "weights identical across ranks at 5 check(s)" in _summary_line(summary, 3, 0, 9.0)
    apart = _summary_line({**summary, "guard_mismatches": 2}, 3, 0, 9.0)
    assert "weights DIFFERED across ranks at 2 of 5 check(s)" in apart
    assert "identical" not in apart
