"""MultiWorkerMirroredStrategy: two ``TF_CONFIG`` workers on localhost (tf_keras),
started by scripts/launch_mwms.sh as a user would."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from multiproc import mpi_env, read_rank_reports, run_bounded, tf_config_workers

from forge_dist.storage import CheckpointStore

pytestmark = pytest.mark.keras
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "scripts", "launch_mwms.sh")
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")


def launch(tmp_path, name, *args, env_extra=None, ok=True):
    pytest.importorskip("tf_keras", reason="tf_keras is in the [tf] extra")
    report = str(tmp_path / f"{name}-{{rank}}.json")
    env = mpi_env(
        {"PYTHON_OVERRIDE": sys.executable, "FORGE_DIST_TIMEOUT": "120", **(env_extra or {})}
    )
    run = run_bounded(
        [LAUNCH, "--checkpoint-dir", str(tmp_path / name), "--report", report, *args],
        env,
        bound_s=300,
    )
    if ok:
        assert run.returncode == 0, run.output[-4000:]
    return run, read_rank_reports(report, missing_ok=True)


def test_two_workers_agree_with_one_writer_and_resume_exactly(tmp_path):
    tb = tmp_path / "tb"
    _, whole = launch(
        tmp_path, "whole", "--epochs", "12", "--patience", "2", "--tensorboard-dir", str(tb)
    )
    w0, w1 = whole
    assert w0["backend"] == "tf" and w0["size"] == 2 and w0["keras"] == "tf_keras"
    assert w0["fingerprint"] == w1["fingerprint"] and w0["learning_rate"] == w1["learning_rate"]
    assert w0["best_epoch"] == w1["best_epoch"]
    assert w0["stopped_epoch"] == w1["stopped_epoch"] > 0, "same stop epoch, and it stopped"
    # One writer: the other worker saved into scratch outside the root, never under it.
    assert w1["touched_root"] == 0 and w0["touched_root"] > 0
    root = tmp_path / "whole"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("step-")) == [
        ".writer.lock",
        "history.csv",
        "writer.lease",
    ]
    assert {c.manifest.writer["rank"] for c in CheckpointStore(str(root)).list()} == {0}
    # TensorBoard: the chief's event files only, its scalars the CSV's (synced) values.
    from forge_dist.keras.tb_events import scalar_values

    pids = {f.split(".")[5] for _, _, fs in os.walk(tb) for f in fs if "tfevents" in f}
    assert pids == {str(w0["pid"])}
    val = scalar_values(str(tb / "validation"))["epoch_loss"]
    with open(root / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [s for s, _ in val] == [int(r["epoch"]) for r in rows]
    assert [v for _, v in val] == [pytest.approx(float(r["val_loss"]), rel=1e-6) for r in rows]
    assert subprocess.run([FORGE, "verify", str(root), "--all"], timeout=60).returncode == 0

    launch(tmp_path, "split", "--epochs", "3", "--patience", "2")
    _, resumed = launch(tmp_path, "split", "--epochs", "12", "--patience", "2", "--resume")
    assert resumed[0]["fingerprint"] == resumed[1]["fingerprint"] == w0["fingerprint"]
    assert resumed[0]["stopped_epoch"] == w0["stopped_epoch"]
    assert (
        subprocess.run([FORGE, "verify", str(tmp_path / "split"), "--all"], timeout=60).returncode
        == 0
    )


def refused_on_every_worker(tmp_path, name, *args, flavor="tf_keras"):
    """scripts/train.py as two TF_CONFIG workers; each one's own output."""
    pytest.importorskip("tf_keras", reason="tf_keras is in the [tf] extra")
    env = mpi_env(
        {"FORGE_DIST_TIMEOUT": "60", "TF_USE_LEGACY_KERAS": "1" if flavor == "tf_keras" else "0"}
    )
    train = [os.path.join(ROOT, "scripts", "train.py"), "--backend", "tf"]
    runs = tf_config_workers(
        2, [*train, "--checkpoint-dir", str(tmp_path / name), *args], env, bound_s=180
    )
    assert [r.returncode != 0 for r in runs] == [True, True], [r.output[-2000:] for r in runs]
    assert not (tmp_path / name).exists(), "nothing may be written"
    return [r.output for r in runs]


def test_keras3_under_multiworker_is_refused_clearly_on_every_worker(tmp_path):
    for out in refused_on_every_worker(tmp_path, "k3", "--epochs", "2", flavor="keras3"):
        assert "Keras 3 does not run under MultiWorkerMirroredStrategy" in out, out[-3000:]
        assert "TF_USE_LEGACY_KERAS=1" in out


def test_async_save_under_multiworker_is_refused_at_construction_on_every_worker(tmp_path):
    for out in refused_on_every_worker(tmp_path, "async", "--epochs", "2", "--async-save"):
        assert "ConfigurationError: async_save is not available under MultiWorker" in out, out[
            -3000:
        ]
        assert "Epoch 1" not in out, "refused before training"
