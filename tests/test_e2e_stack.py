"""The whole production stack under ``mpirun -np 2``, as the tutorial builds it: the
chief's TensorBoard and CSV agree with each other and with the checkpoints across a
preemption, a user's webhook alert fires once, and the NaN, read-only, webhook-down and
early-signal cases end on every rank within seconds with one clear message."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading

import pytest
from multiproc import (
    Background,
    has_committed_step,
    mpirun,
    mpirun_cmd,
    pids_with,
    read_rank_reports,
    wait_until,
)

from forge_dist.preemption import PREEMPTED_EXIT_CODE
from forge_dist.storage import CheckpointStore

pytestmark = [pytest.mark.mpi, pytest.mark.keras]
HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(os.path.dirname(HERE), "scripts", "train.py")
QUICK_S = 90  # a failure must end the job well within this, not at the 600 s deadline


def train(root, report, *extra):
    return [
        TRAIN,
        "--backend",
        "mpi",
        "--checkpoint-dir",
        str(root),
        "--report",
        str(report),
        *extra,
    ]


def csv_rows(root):
    import csv

    with open(os.path.join(root, "history.csv")) as f:
        return list(csv.DictReader(f))


def test_tensorboard_and_csv_agree_across_a_preemption(tmp_path):
    pytest.importorskip("tensorboard")
    from forge_dist.keras.tb_events import scalar_values

    root, tb, report = tmp_path / "root", tmp_path / "tb", tmp_path / "r{rank}.json"
    args = ["--epochs", "6", "--samples", "1024", "--patience", "100", "--tensorboard-dir", str(tb)]
    job = Background(*mpirun_cmd(2, train(root, report, *args)))
    wait_until(lambda: has_committed_step(root), 180, "first checkpoint", job)
    (rank1,) = pids_with(str(root), "OMPI_COMM_WORLD_RANK=1")
    os.kill(rank1, signal.SIGUSR1)
    done = job.wait(240)
    assert done.returncode == PREEMPTED_EXIT_CODE, done.output[-3000:]
    first = read_rank_reports(str(report))
    run = mpirun(2, train(root, report, *args, "--resume"), bound_s=240)
    assert run.returncode == 0, run.output[-3000:]
    second = read_rank_reports(str(report))

    # Only the chief wrote event files, in both attempts.
    files = [f for _, _, fs in os.walk(tb) for f in fs]
    pids = {f.split(".")[5] for f in files if "tfevents" in f}
    assert pids and pids <= {str(first[0]["pid"]), str(second[0]["pid"])}
    # One value per tag per step, after the preemption and the resume.
    train_tags = scalar_values(str(tb / "train"))
    val_tags = scalar_values(str(tb / "validation"))
    for tags in (train_tags, val_tags):
        for tag, values in tags.items():
            steps = [s for s, _ in values]
            assert len(steps) == len(set(steps)), (tag, steps)
    rows = csv_rows(root)
    assert [int(r["epoch"]) for r in rows] == list(range(6))  # one row per epoch, no gap
    # The scalars are the synced values: the same numbers as the CSV.
    assert [s for s, _ in train_tags["epoch_loss"]] == list(range(6))
    for (_, loss), (_, val), row in zip(
        train_tags["epoch_loss"], val_tags["epoch_loss"], rows, strict=True
    ):
        assert loss == pytest.approx(float(row["loss"]), rel=1e-6)
        assert val == pytest.approx(float(row["val_loss"]), rel=1e-6)


@pytest.mark.parametrize("kind", ["az", "gs"])
def test_on_azure_and_gcs_a_preempted_job_resumes_with_its_logs_in_the_bucket(
    kind, request, tmp_path
):
    """production_callbacks("az://…") / ("gs://…") under mpirun -np 2, against Azurite and
    fake-gcs-server: steps commit there, a SIGUSR1 to rank 1 ends both ranks with a
    committed step, the resumed job reads it from the bucket and finishes, and the CSV
    and TensorBoard logs there hold one row (one value per tag) per epoch."""
    pytest.importorskip("tensorboard")
    from conftest import cloud_target

    from forge_dist.keras.tb_events import scalar_values

    t = cloud_target(request, kind, "keras-")
    root, tb, report = t.url, f"{t.url}-tb", tmp_path / "r{rank}.json"
    store = CheckpointStore(root, t.options)
    args = ["--epochs", "4", "--samples", "512", "--patience", "100", "--tensorboard-dir", tb]
    job = Background(*mpirun_cmd(2, train(root, report, *args), t.env))
    wait_until(lambda: bool(store.steps()), 180, "first checkpoint", job)
    (rank1,) = pids_with(root, "OMPI_COMM_WORLD_RANK=1")
    os.kill(rank1, signal.SIGUSR1)
    done = job.wait(240)
    assert done.returncode == PREEMPTED_EXIT_CODE, done.output[-3000:]
    preempted_at = read_rank_reports(str(report))[0]["preempted"]["step"]
    assert preempted_at in store.steps() and store.verify(preempted_at).ok
    run = mpirun(2, train(root, report, *args, "--resume"), t.env, bound_s=240)
    assert run.returncode == 0, run.output[-3000:]
    r0, r1 = read_rank_reports(str(report))
    assert r0["resumed_step"] == r1["resumed_step"] == preempted_at
    assert r0["resumed_from"] == root and r0["fingerprint"] == r1["fingerprint"]
    assert all(store.verify(s).ok for s in store.steps())

    fs = store._backend.fs
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{root}/history.csv").decode())))
    assert [int(r["epoch"]) for r in rows] == list(range(4))  # one row per epoch, no gap
    fs.get(tb, str(tmp_path / "tb"), recursive=True)
    train_tags = scalar_values(str(tmp_path / "tb" / "train"))
    assert [s for s, _ in train_tags["epoch_loss"]] == list(range(4))
    for (_, loss), row in zip(train_tags["epoch_loss"], rows, strict=True):
        assert loss == pytest.approx(float(row["loss"]), rel=1e-6)


class Webhook:
    """A local HTTP server that records what is posted to it."""

    def __init__(self):
        self.posts = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alert"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_webhook_alert_fires_once_from_the_chief_with_the_synced_value(tmp_path):
    hook = Webhook()
    try:
        root, report = tmp_path / "root", tmp_path / "r{rank}.json"
        args = ["--epochs", "4", "--alert-url", hook.url, "--alert-below", "10"]
        run = mpirun(2, train(root, report, *args), bound_s=240)
    finally:
        hook.close()
    assert run.returncode == 0, run.output[-3000:]
    assert len(hook.posts) == 1 and hook.posts[0]["epoch"] == 1  # once, not once a rank
    first_row = csv_rows(root)[0]
    assert hook.posts[0]["val_loss"] == pytest.approx(float(first_row["val_loss"]), rel=1e-9)


def test_a_webhook_that_is_down_ends_every_rank_in_that_epoch(tmp_path):
    hook = Webhook()
    url = hook.url
    hook.close()  # nothing listens there any more
    root, report = tmp_path / "root", tmp_path / "r{rank}.json"
    run = mpirun(
        2,
        train(root, report, "--epochs", "4", "--alert-url", url, "--alert-below", "10"),
        bound_s=QUICK_S,
    )
    assert run.returncode != 0
    assert "OnChief(ThresholdAlert).on_epoch_end failed on rank 0" in run.output  # rank 1
    assert "Connection refused" in run.output


def test_a_nan_on_rank_1_stops_both_ranks_at_the_same_batch(tmp_path):
    root, report = tmp_path / "root", tmp_path / "r{rank}.json"
    run = mpirun(2, train(root, report, "--epochs", "4", "--poison-rank", "1"), bound_s=QUICK_S)
    assert run.returncode == 0, run.output[-3000:]
    # Keras' words (0-based batch), once, on the chief, with which rank saw what.
    assert run.output.count("Invalid loss, terminating training (rank 1: ") == 1
    assert "Batch 3: Invalid loss" in run.output and "batch of epoch 1" in run.output
    r0, r1 = read_rank_reports(str(report))
    assert r0["fingerprint"] == r1["fingerprint"]


@pytest.mark.parametrize(
    "options, needle",
    [
        ("size=1m,ro", "is not writable: read-only filesystem"),
        ("size=96k", "free, but keeping 3 checkpoint(s)"),  # keep_last=2 + keep_best=1
    ],
    ids=["read-only", "full"],
)
def test_an_unusable_root_ends_every_rank_before_the_first_step(tmp_path, options, needle):
    from mounts import tmpfs

    size, _, ro = options.removeprefix("size=").partition(",")
    with tmpfs(tmp_path / "mnt", size, read_only=ro == "ro") as mnt:
        report = tmp_path / "r{rank}.json"
        run = mpirun(2, train(mnt / "run", report, "--epochs", "2"), bound_s=QUICK_S)
    assert run.returncode != 0
    assert needle in run.output
    assert "failed on rank 0: StorageError" in run.output  # rank 1 heard it too
    assert "Epoch 1/2" not in run.output  # before the first step


def test_a_signal_before_fit_still_ends_the_job_with_75(tmp_path):
    root, report = tmp_path / "root", tmp_path / "r{rank}.json"
    run = mpirun(2, train(root, report, "--epochs", "2"), bound_s=240)
    assert run.returncode == 0, run.output[-3000:]
    step = CheckpointStore(str(root)).newest().step
    args = ["--epochs", "4", "--resume", "--signal-before-fit", "1"]
    run = mpirun(2, train(root, report, *args), bound_s=QUICK_S)
    assert run.returncode == PREEMPTED_EXIT_CODE, run.output[-3000:]
    assert "signalled before training began: rank 1: SIGUSR1" in run.output
    assert CheckpointStore(str(root)).newest().step == step  # nothing new, still intact


def test_a_fresh_run_into_another_runs_root_is_refused_on_every_rank(tmp_path):
    root, report = tmp_path / "root", tmp_path / "r{rank}.json"
    run = mpirun(2, train(root, report, "--epochs", "2"), bound_s=240)
    assert run.returncode == 0, run.output[-3000:]
    steps = CheckpointStore(str(root)).steps()
    again = mpirun(2, train(root, report, "--epochs", "2"), bound_s=QUICK_S)  # no --resume
    assert again.returncode != 0
    assert "did not resume from it" in again.output
    assert "failed on rank 0: RunConflictError" in again.output  # rank 1 heard it too
    assert CheckpointStore(str(root)).steps() == steps  # nothing lost
