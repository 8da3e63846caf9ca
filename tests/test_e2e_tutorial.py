"""The tutorial's callback list, ported by swapping imports, in a plain ``model.fit``
under ``mpirun -np 2`` (``_tutorial_train.py``): each rank validates on its own shard,
the list keeps the tutorial's order (checkpoint before TensorBoard and CSV) and holds no
SyncMetrics. Every value logged and decided on is the mean across ranks; both ranks
decide alike; after the chief dies right after a backup commit and the same script runs
again, the CSV has one row and TensorBoard one value per epoch, and everything ends as
in a run never interrupted; ``models/best_model.keras`` holds the best epoch's model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from multiproc import HERE, mpirun, rank_output, read_rank_reports

pytestmark = [pytest.mark.mpi, pytest.mark.keras]
TRAIN = os.path.join(HERE, "_tutorial_train.py")
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")


def run(work, out, *extra, expect_ok=True, flavor="keras3"):
    env = {"TF_USE_LEGACY_KERAS": "1"} if flavor == "tf_keras" else {}
    job = mpirun(
        2,
        [TRAIN, "--work", str(work), "--out", str(out), *extra],
        env,
        bound_s=300,
        mpi_flags=["--output", "tag"],
    )
    if expect_ok:
        assert job.returncode == 0, job.output[-4000:]
    return job


def csv_rows(work):
    with open(os.path.join(work, "training_log.csv")) as f:
        return list(csv.DictReader(f))


def tb_scalars(work):
    from forge_dist.keras.tb_events import scalar_values

    return scalar_values(os.path.join(work, "logs", "validation"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("tutorial")
    job = run(base / "a", base / "a-out")
    return base / "a", read_rank_reports(os.path.join(base / "a-out", "rank-{rank}.json")), job


def test_every_value_logged_and_decided_on_is_the_mean_across_ranks(uninterrupted):
    work, (r0, r1), job = uninterrupted
    assert [e["val_accuracy"] for e in r0["raw"]] != [e["val_accuracy"] for e in r1["raw"]]
    rows = csv_rows(work)
    assert len(rows) == len(r0["seen"])
    for raw0, raw1, seen, row in zip(r0["raw"], r1["raw"], r0["seen"], rows, strict=True):
        for key in ("val_accuracy", "val_loss", "loss", "accuracy"):
            mean = (raw0[key] + raw1[key]) / 2  # equal shards: the plain mean
            assert seen[key] == pytest.approx(mean, rel=1e-12), (key, seen["epoch"])
            assert float(row[key]) == pytest.approx(mean, rel=1e-6)
    # History (after every callback) and TensorBoard show the same synced values.
    assert r0["history"]["val_accuracy"] == [e["val_accuracy"] for e in r0["seen"]]
    tb = tb_scalars(work)
    assert [v for _, v in tb["epoch_accuracy"]] == pytest.approx(
        [e["val_accuracy"] for e in r0["seen"]], rel=1e-6
    )
    # Both ranks took the same decisions with the same values: logs, learning rate, stop.
    assert r0["seen"] == r1["seen"] and r0["history"] == r1["history"]
    assert r0["stopped_epoch"] == r1["stopped_epoch"] and r0["final"] == r1["final"]
    assert r0["weights"] == r1["weights"]
    # The tutorial's own alert runs on every rank: the chief says how to run it once.
    note = "AlertCallback is not a forge_dist callback: it runs on every rank"
    assert note in rank_output(job.output, 0) and note not in rank_output(job.output, 1)
    # Keras' progress lines come from the chief alone (not twice, interleaved).
    assert "Epoch 1/8" in rank_output(job.output, 0)
    assert "Epoch 1/" not in rank_output(job.output, 1)


def test_best_model_keras_is_the_best_epochs_model_written_by_the_chief(uninterrupted):
    keras = pytest.importorskip("keras")
    from forge_dist.keras._compat import weights_fingerprint

    work, (r0, r1), _ = uninterrupted
    path = os.path.join(work, "models", "best_model.keras")
    accs = [e["val_accuracy"] for e in r0["seen"]]
    best = int(np.argmax(accs))  # the first of equals: Keras saves on a strict improvement
    loaded = keras.models.load_model(path)
    assert weights_fingerprint(loaded.get_weights()) == r0["weights"][best]
    with open(path + ".manifest.json") as f:
        side = json.load(f)
    assert side["epoch"] == best and side["writer"]["rank"] == 0
    out = subprocess.run([FORGE, "verify", path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # Only the chief touched the work folder; the backups were removed at the end.
    assert r1["touched"] == [] and r0["touched"]
    assert not os.path.exists(os.path.join(work, "backup"))


@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_a_chief_killed_right_after_a_commit_resumes_with_one_row_and_value_per_epoch(
    tmp_path, uninterrupted, flavor
):
    if flavor == "keras3":
        a_work, (a0, _), _ = uninterrupted
    else:
        a_work = tmp_path / "a"
        run(a_work, tmp_path / "a-out", flavor=flavor)
        a0, _ = read_rank_reports(os.path.join(tmp_path / "a-out", "rank-{rank}.json"))
    work, out = tmp_path / "b", tmp_path / "b-out"
    killed = run(work, out, "--crash-after-commit", "3", expect_ok=False, flavor=flavor)
    assert killed.returncode != 0
    assert len(csv_rows(work)) == 3  # epochs 1-3 were logged, then committed
    resumed = run(work, out, flavor=flavor)
    b0, b1 = read_rank_reports(os.path.join(out, "rank-{rank}.json"))
    assert b0["flavor"] == a0["flavor"] == flavor
    # The resumed fit began at epoch 4, on both ranks, and ended as the uninterrupted one.
    assert [e["epoch"] for e in b0["seen"]] == [e["epoch"] for e in a0["seen"][3:]]
    assert b0["seen"] == b1["seen"] == a0["seen"][3:]
    assert b0["final"] == b1["final"] == a0["final"]
    assert b0["stopped_epoch"] == a0["stopped_epoch"]
    # One CSV row per epoch, the same rows as the uninterrupted run's.
    assert csv_rows(work) == csv_rows(a_work)
    # One TensorBoard value per tag per epoch, the uninterrupted run's.
    b_tb, a_tb = tb_scalars(work), tb_scalars(a_work)
    assert b_tb.keys() == a_tb.keys()
    for tag, values in b_tb.items():
        steps = [s for s, _ in values]
        assert steps == sorted(set(steps)), (tag, steps)
        assert values == a_tb[tag], tag  # (step, value): the same training, bit for bit
    # The best model is the uninterrupted run's best.
    if flavor == "keras3":
        keras = pytest.importorskip("keras")
        from forge_dist.keras._compat import weights_fingerprint

        paths = (work / "models" / "best_model.keras", a_work / "models" / "best_model.keras")
        best = [keras.models.load_model(p) for p in paths]
        assert weights_fingerprint(best[0].get_weights()) == weights_fingerprint(
            best[1].get_weights()
        )
    sides = []
    for w in (work, a_work):
        with open(w / "models" / "best_model.keras.manifest.json") as f:
            sides.append(json.load(f))
    assert sides[0]["epoch"] == sides[1]["epoch"]
    assert "resumed from step" in rank_output(resumed.output, 0)


@pytest.mark.horovod
def test_under_horovodrun_too_every_value_is_the_mean_and_decisions_agree(tmp_path):
    from multiproc import horovodrun

    out, work = tmp_path / "out", tmp_path / "w"
    job = horovodrun(2, [TRAIN, "--work", str(work), "--out", str(out), "--backend", "auto"])
    assert job.returncode == 0, job.output[-4000:]
    r0, r1 = read_rank_reports(os.path.join(out, "rank-{rank}.json"))
    assert r0["backend"] == "horovod"
    for raw0, raw1, seen in zip(r0["raw"], r1["raw"], r0["seen"], strict=True):
        mean = (raw0["val_accuracy"] + raw1["val_accuracy"]) / 2
        assert seen["val_accuracy"] == pytest.approx(mean, rel=1e-12)
    assert r0["seen"] == r1["seen"] and r0["final"] == r1["final"]
    assert len(csv_rows(work)) == len(r0["seen"])
