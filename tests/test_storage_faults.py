"""A faulty network between the store and each cloud's local endpoint (a proxy on
127.0.0.1 in front of moto, Azurite and fake-gcs-server that resets connections, answers
503, stalls past the timeout and truncates responses): every save either commits a
complete step or fails with one clear error, verify and download never accept a partial
step, and nothing hangs."""

from __future__ import annotations

import os
import time
from urllib.parse import urlparse

import pytest
from conftest import CLOUDS
from faultproxy import FaultProxy, Frozen

from forge_dist.errors import ForgeDistError
from forge_dist.storage import CheckpointStore

TRIALS = 10
TRIAL_BOUND_S = 120  # retries with backoff and short timeouts stay inside this
pytestmark = [pytest.mark.s3, pytest.mark.slow]


def within_bound(what: str, t0: float, frozen: Frozen, proxy: FaultProxy) -> None:
    """The time since ``t0``, less any time the process stood still, is inside the bound."""
    took = time.monotonic() - t0
    assert took - frozen.seconds < TRIAL_BOUND_S, (
        f"{what} took {took:.0f}s ({frozen.seconds:.0f}s of it with the process standing "
        f"still), past {TRIAL_BOUND_S}s; the proxy saw {dict(proxy.counts)}"
    )


@pytest.fixture(params=CLOUDS)
def cloud(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def proxy(cloud):
    target = urlparse(cloud.url)
    p = FaultProxy((target.hostname, target.port), rate=0.15, seed=7)
    yield p
    p.close()


def test_the_bounds_leave_out_only_time_the_process_stood_still():
    """The meter the bounds subtract counts an interpreter that runs no other thread (a
    long switch interval and a busy loop stand in for a paused process), and nothing
    for a thread that waits on a socket."""
    import socket
    import sys

    interval = sys.getswitchinterval()
    try:
        with Frozen() as busy:
            sys.setswitchinterval(30)  # this thread keeps the interpreter...
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.5:  # ...for 2.5 s
                pass
            sys.setswitchinterval(interval)
    finally:
        sys.setswitchinterval(interval)
    assert 1.5 < busy.seconds < 4, busy.seconds
    a, b = socket.socketpair()
    a.settimeout(2.5)
    with a, b, Frozen() as waiting, pytest.raises(TimeoutError):
        a.recv(1)  # blocked on the network for 2.5 s
    assert waiting.seconds == 0


def test_saves_through_a_faulty_network_commit_whole_or_fail_clearly(cloud, proxy, record_property):
    root = f"{cloud.kind}://{cloud.bucket}/faults-{os.urandom(4).hex()}"
    faulty = CheckpointStore(root, cloud.options_for(proxy.url))
    clean = CheckpointStore(root, cloud.options)
    committed, failed = [], []
    trials = TRIALS
    for step in range(1, trials + 1):
        t0 = time.monotonic()
        try:
            with Frozen() as frozen, faulty.writer(step, metrics={"val_loss": 1 / step}) as w:
                w.add_bytes("model.bin", os.urandom(300_000))
                w.add_bytes("sub/opt.bin", os.urandom(20_000))
            committed.append(step)
        except ForgeDistError as e:
            failed.append(step)
            assert len(str(e).splitlines()) == 1  # one clear line
        within_bound(f"save {step}", t0, frozen, proxy)
    corrupt = [s for s in clean.steps() if not clean.verify(s).ok]
    record_property("fault_trials", trials)
    record_property("faults_injected", dict(proxy.counts))
    record_property("corrupt_commits", len(corrupt))
    print(
        f"faulty network ({cloud.kind}): {trials} saves, {len(committed)} committed, "
        f"{len(failed)} failed clearly, faults {dict(proxy.counts)}, corrupt commits {len(corrupt)}"
    )
    assert corrupt == []
    assert sum(v for k, v in proxy.counts.items() if k != "requests") > 0, "no fault injected"
    # A failed save never left a step readers trust.
    assert set(clean.steps()) <= set(committed)
    assert committed, "retries should get most saves through"


def test_verify_and_download_through_a_faulty_network_never_accept_a_partial_step(
    cloud, proxy, tmp_path
):
    root = f"{cloud.kind}://{cloud.bucket}/faults-read-{os.urandom(4).hex()}"
    clean = CheckpointStore(root, cloud.options)
    with clean.writer(1) as w:
        w.add_bytes("model.bin", os.urandom(400_000))
    # A partial step: payload written, no manifest (a writer that died).
    clean._backend.fs.pipe_file(f"{root}/step-00000002/model.bin", b"half")
    faulty = CheckpointStore(root, cloud.options_for(proxy.url))

    def attempt(what, op):
        """One operation through the faults: its result, or None after one clear error."""
        t0 = time.monotonic()
        try:
            with Frozen() as frozen:
                result = op()
        except ForgeDistError as e:
            assert len(str(e).splitlines()) == 1, f"{what}: {e}"
            result = None
        within_bound(what, t0, frozen, proxy)
        return result

    # Each check runs until it has answered at least twice (each try may meet a fault
    # and fail clearly instead); none may ever accept the partial step.
    answers: dict[str, int] = {"verify 1": 0, "verify partial": 0, "download": 0}
    end = time.monotonic() + 4 * TRIAL_BOUND_S
    for i in range(30):
        if min(answers.values()) >= 2 or time.monotonic() > end:
            break
        report = attempt("verify 1", lambda: faulty.verify(1))
        if report is not None:
            answers["verify 1"] += 1
            assert report.ok or all(
                p.kind in ("io_error", "missing", "size_mismatch", "hash_mismatch")
                for p in report.problems
            )
        partial = attempt("verify partial", lambda: faulty.verify("step-00000002"))
        if partial is not None:
            answers["verify partial"] += 1
            assert not partial.ok, "a step without a manifest verified"
        dest = attempt("download", lambda i=i: faulty.download(1, tmp_path / f"dl{i}"))
        if dest is not None:
            answers["download"] += 1
            assert os.path.getsize(os.path.join(dest, "model.bin")) == 400_000
        else:
            assert not (tmp_path / f"dl{i}").exists()  # complete or not at all
    assert min(answers.values()) >= 2, answers
    assert sum(v for k, v in proxy.counts.items() if k != "requests") > 0, "no fault injected"
    newest = attempt("newest", lambda: faulty.newest(verify="full"))
    assert newest is None or newest.step == 1  # never the partial step 2
    assert clean.steps() == [1]


def test_a_network_that_keeps_failing_is_one_clear_error_and_no_step(cloud):
    target = urlparse(cloud.url)
    dead = FaultProxy((target.hostname, target.port), rate=1.0, faults=("reset", "slowdown"))
    try:
        root = f"{cloud.kind}://{cloud.bucket}/faults-dead-{os.urandom(4).hex()}"
        faulty = CheckpointStore(root, cloud.options_for(dead.url, attempts=1))
        t0 = time.monotonic()
        with Frozen() as frozen, pytest.raises(ForgeDistError) as err, faulty.writer(1) as w:
            w.add_bytes("model.bin", os.urandom(50_000))
        within_bound("a save", t0, frozen, dead)
        assert len(str(err.value).splitlines()) == 1 and "testing" not in str(err.value)
        assert CheckpointStore(root, cloud.options).steps() == []
    finally:
        dead.close()


@pytest.mark.mpi
@pytest.mark.keras
def test_under_mpirun_a_save_that_fails_on_the_network_ends_every_rank(s3, tmp_path):
    import json

    from multiproc import Background, mpirun_cmd, wait_until

    target = urlparse(s3.url)
    proxy = FaultProxy((target.hostname, target.port), rate=0.0, faults=("reset", "slowdown"))
    try:
        root = f"s3://{s3.bucket}/faults-mpi-{os.urandom(4).hex()}"
        clean = CheckpointStore(root, s3.options)
        train = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train.py"
        )
        args = [
            train,
            "--backend",
            "mpi",
            "--checkpoint-dir",
            root,
            "--epochs",
            "20",
            "--patience",
            "100",
            "--samples",
            "1024",
            "--storage-options",
            json.dumps(s3.options_for(proxy.url, attempts=2)),
            "--report",
            str(tmp_path / "rank{rank}.json"),
        ]
        job = Background(*mpirun_cmd(2, args, {"FORGE_DIST_TIMEOUT": "120"}))
        wait_until(lambda: bool(clean.steps()), 180, "first checkpoint", job)
        proxy.rate = 1.0  # from now on the network to S3 is down
        done = job.wait(240)
        assert done.returncode != 0
        # Rank 1 learned of the failed save: through the collective the save's outcome is
        # agreed in, or through rank 0's notice on its way out. Read from rank 1's own
        # report, written before it re-raises: mpirun may end it before its traceback is out.
        learned = json.loads((tmp_path / "rank1.json").read_text())["error"]
        assert "failed on rank 0" in learned or "rank 0 failed" in learned, learned
        assert all(clean.verify(s).ok for s in clean.steps())  # nothing partial committed
    finally:
        proxy.close()


def test_the_azure_client_retries_as_the_storage_options_say(az):
    """adlfs hands the Blob SDK no retry option, and the SDK's own policy tries each
    request 4 times, 15 + 3**n s apart. The backend rebuilds the client with the options'
    ``retry_total`` (and adlfs' timeouts): through a network that stays down, each
    request is tried 1 + retry_total times."""
    target = urlparse(az.url)
    tries = {}
    for retries in (0, 2):
        dead = FaultProxy((target.hostname, target.port), rate=1.0, faults=("reset",))
        try:
            root = f"az://{az.bucket}/retries-{os.urandom(4).hex()}"
            store = CheckpointStore(root, az.options_for(dead.url, attempts=retries))
            with pytest.raises(ForgeDistError), store.writer(1) as w:
                w.add_bytes("model.bin", b"weights")
            tries[retries] = dead.counts["requests"]
        finally:
            dead.close()
    assert tries[2] == 3 * tries[0] > 0, tries
