"""Eight ranks on this two-core box (``mpirun -np 8 --oversubscribe``): the same
guarantees as at two, one writer whose bytes per save are one model's, and a dead rank
among eight turned into a clear error within the deadline on every survivor."""

from __future__ import annotations

import os

import pytest
from multiproc import (
    HERE,
    assert_chief_tensorboard,
    finished_normally,
    mpirun,
    rank_output,
    read_rank_reports,
)

from forge_dist.storage import CheckpointStore

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
TRAIN = os.path.join(HERE, "_mpi_train.py")
RANKS = 8


def test_eight_ranks_agree_on_every_decision_with_one_writer(tmp_path):
    root, out = tmp_path / "run", tmp_path / "out"
    epochs = 8  # (the odd ranks validate on flipped labels, as rank 1 does among 2)
    args = [TRAIN, "--root", str(root), "--out", str(out), "--patience", "2"]
    args += ["--epochs", str(epochs)]
    run = mpirun(RANKS, args, bound_s=600)
    assert run.returncode == 0, run.output[-4000:]
    reports = read_rank_reports(str(out / "rank-{rank}.json"), ranks=RANKS)
    r0 = reports[0]
    assert [r["size"] for r in reports] == [RANKS] * RANKS
    assert r0["epochs_run"] < epochs and r0["stopped_epoch"] > 0, r0["val_losses"]
    for r in reports[1:]:
        assert r["epochs_run"] == r0["epochs_run"] and r["stopped_epoch"] == r0["stopped_epoch"]
        assert r["fingerprints"] == r0["fingerprints"], f"rank {r['rank']}'s weights differ"
        assert r["lrs"] == r0["lrs"] and r["val_losses"] == r0["val_losses"]
        assert r["final_fingerprint"] == r0["final_fingerprint"]
        assert r["touched"] == [], f"rank {r['rank']} touched the checkpoint root"
    assert r0["final_fingerprint"] == r0["fingerprints"][r0["best_epoch"]]
    store = CheckpointStore(str(root))
    infos = store.list()
    assert infos and {c.manifest.writer["rank"] for c in infos} == {0}
    assert {c.manifest.writer["world_size"] for c in infos} == {RANKS}
    # Bytes per save: one model's, written once (a plain Keras ModelCheckpoint on every
    # rank would write eight).
    one = {c.step: c.manifest.total_bytes for c in infos}
    on_disk = {
        c.step: sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(root / c.name)
            for f in fs
            if f != "manifest.json"
        )
        for c in infos
    }
    assert on_disk == one
    assert_chief_tensorboard(str(root / "tb"), r0, reports[1])
    for step in store.steps():
        assert store.verify(step).ok


def test_a_dead_rank_among_eight_is_a_clear_error_on_every_survivor(tmp_path):
    deadline = 10
    root, out = tmp_path / "dead", tmp_path / "out"
    run = mpirun(
        RANKS,
        [TRAIN, "--root", str(root), "--out", str(out), "--kill-rank1-at-epoch", "1"]
        + ["--kill-rank", "5"],
        {"FORGE_DIST_TIMEOUT": str(deadline)},
        bound_s=300,
        # Survivors live on (forge_dist's deadline acts); each line tagged with its rank.
        mpi_flags=["--enable-recovery", "--output", "tag"],
    )
    assert f"timed out after {deadline}." in run.output, run.output[-4000:]
    for rank in set(range(RANKS)) - {5}:
        said = rank_output(run.output, rank)
        assert "CollectiveTimeoutError" in said, f"rank {rank} said:\n{said[-2000:]}"
        assert "rank(s) 5 did not answer" in said
    assert finished_normally(out, RANKS) == [], "no rank may finish normally"
