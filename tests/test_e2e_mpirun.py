"""Real two-process training under ``mpirun -np 2`` (mpi4py backend).

Each rank validates on its own shard and rank 1's shard disagrees, so plain Keras
callbacks stop the ranks at different epochs (the control); forge_dist's keep them
together, with one writer and identical weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from multiproc import (
    HERE,
    assert_ranks_consistent,
    finished_normally,
    mpirun,
    rank_output,
    read_rank_reports,
)

from forge_dist.storage import CheckpointStore

pytestmark = pytest.mark.mpi
TRAIN = os.path.join(HERE, "_mpi_train.py")
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")
COMMON = ["--patience", "2", "--epochs", "8"]


def results(out_dir) -> list[dict]:
    return read_rank_reports(os.path.join(out_dir, "rank-{rank}.json"))


def train(tmp_path, name, *extra, flavor="keras3", env=None, expect_ok=True, **kw):
    root, out = tmp_path / name, tmp_path / f"{name}-out"
    env = dict(env or {})
    if flavor == "tf_keras":
        env["TF_USE_LEGACY_KERAS"] = "1"
    run = mpirun(2, [TRAIN, "--root", str(root), "--out", str(out), *extra], env, **kw)
    if expect_ok:
        assert run.returncode == 0, run.output[-4000:]
    return run, root, out


def test_control_plain_keras_callbacks_stop_ranks_at_different_epochs(tmp_path):
    _, root, out = train(tmp_path, "control", "--mode", "control", *COMMON)
    r0, r1 = results(out)
    assert r0["epochs_run"] != r1["epochs_run"], "the control must show the divergence"
    assert r0["final_fingerprint"] != r1["final_fingerprint"]


@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_ranks_agree_on_every_decision_and_hold_identical_weights(tmp_path, flavor):
    _, root, out = train(tmp_path, "run", *COMMON, flavor=flavor)
    r0, r1 = results(out)
    assert r0["flavor"] == r1["flavor"] == flavor
    assert r0["backend"] == "mpi"
    assert_ranks_consistent(r0, r1, root, epochs=8)
    assert (root / "history.csv").read_text().count("\n") == r0["epochs_run"] + 1


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    _, _, out_a = train(tmp_path, "a", *COMMON)
    killed, root_b, _ = train(
        tmp_path, "b", *COMMON, "--kill-rank0-after-epoch", "0", expect_ok=False
    )
    assert killed.returncode != 0
    assert CheckpointStore(str(root_b)).steps() == [8]
    _, _, out_b = train(tmp_path, "b", *COMMON, "--resume")
    a0, a1 = results(out_a)
    b0, b1 = results(out_b)
    assert b0["resumed_from_step"] == b1["resumed_from_step"] == 8
    # The resumed run too has one reader and writer: rank 1 never touched the root,
    # restore_latest included.
    assert b1["touched"] == [], b1["touched"][:5]
    assert any("step-00000008" in t for t in b0["touched"]), "the chief read the step"
    # Epochs after the resume match the uninterrupted run bit for bit.
    assert b0["fingerprints"] == b1["fingerprints"] == a0["fingerprints"][1:]
    assert b0["stopped_epoch"] == a0["stopped_epoch"]
    assert b0["final_lr"] == a0["final_lr"]
    assert b0["final_fingerprint"] == b1["final_fingerprint"] == a0["final_fingerprint"]
    lines = (tmp_path / "b" / "history.csv").read_text().splitlines()
    epochs = [line.split(",")[0] for line in lines[1:]]
    assert epochs == [str(e) for e in range(a0["epochs_run"])], "no epoch twice, none lost"
    assert subprocess.run([FORGE, "verify", str(root_b), "--all"], timeout=60).returncode == 0


def test_a_dead_rank_becomes_an_error_on_the_survivor_within_the_deadline(tmp_path):
    deadline = 6
    run, _, out = train(
        tmp_path,
        "dead",
        "--kill-rank1-at-epoch",
        "1",
        env={"FORGE_DIST_TIMEOUT": str(deadline)},
        expect_ok=False,
        bound_s=120,
        # Keep the survivor alive when rank 1 dies (Open MPI would kill it otherwise), so
        # what is shown is forge_dist's deadline, not the launcher's clean-up.
        mpi_flags=["--enable-recovery"],
    )
    assert "CollectiveTimeoutError" in run.output
    assert "rank(s) 1 did not answer" in run.output
    assert f"timed out after {deadline}." in run.output
    assert "MPI_ABORT" in run.output and "Errorcode: 70" in run.output
    assert finished_normally(out, 2) == [], "the survivor must not finish normally"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"class": "SyncEarlyStopping", "patience": -1}, "patience must be >= 0"),
        ({"class": "SyncEarlyStopping", "mode": "maximum"}, "mode must be"),
        ({"class": "SyncReduceLROnPlateau", "factor": 1.5}, "factor must be in"),
        ({"class": "ChiefModelCheckpoint", "directory": "gs://bucket/run"}, "forge-dist[gcs]"),
    ],
)
def test_bad_configuration_fails_on_every_rank_at_construction(
    tmp_path, bad, message, without_gcsfs
):
    run, _, _ = train(
        tmp_path, "bad", "--bad", json.dumps(bad), env=without_gcsfs, expect_ok=False, bound_s=120
    )
    assert run.returncode != 0
    assert run.output.count(message) >= 2, run.output[-3000:]  # once per rank


def test_a_bad_argument_on_one_rank_ends_every_rank_at_once_naming_it(tmp_path):
    """A rank-dependent mistake (rank 1 alone passes mode="maximum"): rank 1 raises at
    construction, rank 0 would wait in its first collective until the 600 s deadline;
    rank 1 tells it on its way out, and rank 0 raises at once, naming rank 1's error."""
    bad = json.dumps({"class": "SyncEarlyStopping", "mode": "maximum"})
    run, _, _ = train(
        tmp_path,
        "bad",
        "--bad",
        bad,
        "--bad-rank",
        "1",
        expect_ok=False,
        bound_s=90,  # far below the deadline (FORGE_DIST_TIMEOUT, 600 s)
        mpi_flags=["--output", "tag"],
    )
    assert run.returncode != 0
    said = rank_output(run.output, 0)
    assert "RankFailedError" in said and "rank 1 failed before reaching it" in said, said[-2000:]
    assert "mode must be 'auto', 'min' or 'max', got 'maximum'" in said
    assert "mode must be" in rank_output(run.output, 1)


COLLECTIVES = """
import json, sys
import numpy as np
from forge_dist import get_communicator
c = get_communicator("mpi")
r = c.rank
out = {
    "sum": c.allreduce([r + 1.0, -r], op="sum").tolist(),
    "mean": c.allreduce([r + 1.0, -r], op="mean").tolist(),
    "max": c.allreduce([r + 1.0, -r], op="max").tolist(),
    "min": c.allreduce([r + 1.0, -r], op="min").tolist(),
    "any": [c.any(r == 1), c.any(False)],
    "all": [c.all(r == 1), c.all(True)],
    "broadcast": c.broadcast({"from": r}, root=1),
    "allgather": c.allgather(r * 10),
}
json.dump(out, open(sys.argv[1].replace("{rank}", str(r)), "w"))
"""


def test_collectives_reduce_across_real_ranks(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    run = mpirun(2, [str(script), str(tmp_path / "r{rank}.json")], bound_s=120)
    assert run.returncode == 0, run.output[-3000:]
    r0, r1 = read_rank_reports(str(tmp_path / "r{rank}.json"))
    assert r0 == r1
    assert r0["sum"] == [3.0, -1.0] and r0["mean"] == [1.5, -0.5]
    assert r0["max"] == [2.0, 0.0] and r0["min"] == [1.0, -1.0]
    assert r0["any"] == [True, False] and r0["all"] == [False, True]
    assert r0["broadcast"] == {"from": 1} and r0["allgather"] == [0, 10]


LATE = """
import os, signal, sys, time
from mpi4py import MPI
from forge_dist import get_communicator
from forge_dist.comm.mpi import _TAG_ROLLCALL
c = get_communicator("mpi")
c.allreduce([1.0], name="warm")
if c.rank == 2:
    os.kill(os.getpid(), signal.SIGKILL)  # dead
if c.rank in (1, 3):  # busy until rank 0, past its deadline, holds its roll call
    end = time.monotonic() + 60
    while not MPI.COMM_WORLD.Iprobe(source=0, tag=_TAG_ROLLCALL):
        if time.monotonic() > end:
            sys.exit("rank 0 never held its roll call")
        time.sleep(0.01)
try:
    c.allreduce([1.0], name="after")
except Exception as e:
    if c.rank in (1, 3):
        time.sleep(1.0)  # a handler slow to say what happened: the abort must wait for it
        print(f"rank {c.rank} handled: {type(e).__name__}: {e}", flush=True)
    raise
"""


def test_every_survivor_says_its_own_error_before_the_job_is_aborted(tmp_path):
    """Rank 2 dies; rank 0 times out, holds its roll call and aborts the job at exit.
    Ranks 1 and 3 enter the collective only once rank 0 has given up, and take their time
    to say so: each must still end with its own error, killed neither by rank 0's abort
    nor by each other's before it has said it."""
    script = tmp_path / "late.py"
    script.write_text(LATE)
    deadline = 3
    run = mpirun(
        4,
        [str(script)],
        {"FORGE_DIST_TIMEOUT": str(deadline)},
        bound_s=90,
        mpi_flags=["--enable-recovery", "--output", "tag"],
    )
    first = rank_output(run.output, 0)
    assert f"collective 'after' timed out after {deadline}." in first, run.output[-3000:]
    assert "rank(s) 2 did not answer" in first
    for rank in (1, 3):
        late = rank_output(run.output, rank)
        said = f"rank {rank} handled: CollectiveTimeoutError: collective 'after' given up"
        assert said in late, late[-2000:]
        assert "rank 0 timed out" in late and "rank(s) 2 did not answer" in late
    assert "MPI_ABORT was invoked on rank 0" in run.output  # the first one ends the job
