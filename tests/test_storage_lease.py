"""Fencing: two real writer processes race on one root (local disk and the real S3,
Azure Blob and GCS endpoints on 127.0.0.1); the older generation can neither commit nor
delete once the newer one holds the lease, its staging is cleaned, and the newer
writer's steps are untouched."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading

import pytest
from conftest import CLOUDS, cloud_target

from forge_dist.errors import StaleWriterError
from forge_dist.storage import CheckpointStore
from forge_dist.storage.lease import Lease

HERE = os.path.dirname(os.path.abspath(__file__))
BOUND_S = 120


@pytest.fixture(params=["local", *CLOUDS])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root"), None, {}
    t = cloud_target(request, request.param, "lease-")
    return t.url, t.options, t.env


@pytest.fixture(params=CLOUDS)
def cloud(request):
    t = cloud_target(request, request.param, "lease-")
    return t.url, t.options, t.env


class Writer:
    """``_lease_writer.py`` in its own process, driven line by line; every wait for it is
    bounded (a writer that hangs fails the test, it is killed)."""

    def __init__(self, url, options, env, step, action="commit", pause_at=None):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "_lease_writer.py"),
                url,
                json.dumps(options or {}),
                str(step),
                action,
                *([pause_at] if pause_at else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # the end of its output

    def _fail(self, what):
        self.proc.kill()
        self.proc.wait()
        pytest.fail(f"the writer did not {what} within {BOUND_S}s")

    def expect(self, word):
        try:
            line = self.lines.get(timeout=BOUND_S)
        except queue.Empty:
            self._fail(f"say {word}")
        assert line is not None and line.startswith(word), line
        return line

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def go(self):
        self.send("go")
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            self._fail("finish")
        said = []
        while (line := self.lines.get(timeout=BOUND_S)) is not None:
            said.append(line)
        assert self.proc.returncode == 0, said
        return "\n".join(said)


def test_an_older_writer_cannot_commit_after_a_newer_one_took_over(root):
    url, options, env = root
    old = Writer(url, options, env, 1)
    assert old.expect("LEASED") == "LEASED 1"
    old.expect("STAGED")
    new = Writer(url, options, env, 2)
    assert new.expect("LEASED") == "LEASED 2"
    new.expect("STAGED")
    assert new.go() == "DONE"
    said = old.go()
    assert said.startswith("STALE a newer writer took over") and "generation 2" in said
    store = CheckpointStore(url, options)
    assert store.steps() == [2] and store.verify(2).ok
    assert store.lease().generation == 2
    assert store.get(2).manifest.writer["generation"] == 2
    if "://" in url:
        # Its files are under step-00000001/ itself, where a newer writer might be
        # writing too: left for gc (or the begin of that step), never removed by it.
        assert [(st.name, st.kind) for st in store.list_staging()] == [
            ("step-00000001", "uncommitted")
        ]
        store.gc(grace_s=0)
    assert store.list_staging() == []  # the stale writer's POSIX staging is gone


def test_a_commit_that_raced_a_takeover_is_withdrawn_on_object_stores(cloud):
    """The takeover lands between the old writer's lease check and its manifest PUT (the
    window an object store has no transaction over): the old writer's commit is
    withdrawn at once and it is told so; the newer writer's step is intact."""
    url, options, env = cloud
    old = Writer(url, options, env, 1, pause_at="before-manifest")
    assert old.expect("LEASED") == "LEASED 1"
    old.expect("STAGED")
    old.send("go")
    old.expect("POINT before-manifest")  # checked the lease: still its own
    new = Writer(url, options, env, 2)
    assert new.expect("LEASED") == "LEASED 2"
    new.expect("STAGED")
    assert new.go() == "DONE"
    said = old.go()  # its manifest PUT goes through, then the check after it
    assert said.startswith("STALE a newer writer took over") and "generation 2" in said
    store = CheckpointStore(url, options)
    assert store.steps() == [2] and store.verify(2).ok
    assert store.get(2).manifest.writer["generation"] == 2
    fs = store._backend.fs
    assert not fs.exists(f"{url}/step-00000001"), "the withdrawn step left files behind"
    assert store.lease().generation == 2


def test_an_older_writer_cannot_delete_the_newer_ones_steps(root):
    url, options, env = root
    old = Writer(url, options, env, 1, action="delete:2")
    old.expect("LEASED")
    old.expect("STAGED")
    new = Writer(url, options, env, 2)
    new.expect("LEASED")
    new.expect("STAGED")
    assert new.go() == "DONE"
    assert old.go().startswith("STALE")
    assert CheckpointStore(url, options).steps() == [2]


def test_the_newest_lease_holder_commits_and_deletes(tmp_path):
    store = CheckpointStore(str(tmp_path / "r"))
    first = store.take_lease("a")
    with store.writer(1, lease=first) as w:
        w.add_bytes("f", b"1")
    second = store.take_lease("b")
    with store.writer(2, lease=second) as w:
        w.add_bytes("f", b"2")
    store.delete(1, lease=second)
    with pytest.raises(StaleWriterError), store.writer(3, lease=first) as w:
        w.add_bytes("f", b"3")
    assert store.steps() == [2] and store.list_staging() == []
    assert sorted(os.listdir(tmp_path / "r")) == [".writer.lock", "step-00000002", "writer.lease"]


def test_taking_the_lease_is_a_compare_and_swap_on_object_stores(cloud):
    """The backend's conditional write, against each emulator (S3: If-Match/If-None-Match
    on PUT; Azure: the same on Put Blob; GCS: ifGenerationMatch on a multipart upload)."""
    url, options, _ = cloud
    store = CheckpointStore(url, options)
    backend = store._backend  # the primitive under the lease, tested on its own
    one = Lease(1, "me", "host.1.aaaa", "2026-01-01T00:00:00+00:00").to_bytes()
    assert backend.conditional_writes
    assert backend.write_lease(one, None)
    assert not backend.write_lease(one, None)  # if absent: someone holds it already
    _, token = backend.read_lease()
    store.take_lease("other")  # someone else moves it on
    assert not backend.write_lease(one, token)  # if unchanged: a stale token is refused
    assert store.lease().generation == 2


def test_a_stale_writer_leaves_the_same_step_that_a_newer_writer_committed(root):
    """Both write step 7: the newer generation commits first; the older one, refused at
    its commit, must not remove the step (on object stores the step's own prefix is the
    staging)."""
    url, options, _ = root
    store = CheckpointStore(url, options)
    first = store.take_lease("a")
    with pytest.raises(StaleWriterError), store.writer(7, lease=first) as old:
        old.add_bytes("f", b"old")
        second = store.take_lease("b")
        with store.writer(7, lease=second) as new:
            new.add_bytes("f", b"new")
    assert store.steps() == [7]
    assert store.verify(7).ok
    with store.open_file(7, "f") as f:
        assert f.read() == b"new"


def test_a_stale_writer_cannot_overwrite_a_file_of_the_step_a_newer_writer_committed(root):
    """The older generation began step 7 and goes on after the newer one committed the
    same step: its next file is refused before it lands (on object stores it would land
    on the newer step's own key), and the newer step stays whole."""
    url, options, _ = root
    store = CheckpointStore(url, options)
    old = store.writer(7, lease=store.take_lease("a"))
    old.begin()
    with store.writer(7, lease=store.take_lease("b")) as new:
        new.add_bytes("f", b"new")
        with new.open("g") as g:
            g.write(b"new-g")
    with pytest.raises(StaleWriterError):
        old.add_bytes("f", b"old")
    with pytest.raises(StaleWriterError), old.open("g") as g:
        g.write(b"old-g")
    with pytest.raises(StaleWriterError):
        old.commit()
    assert store.steps() == [7] and store.verify(7).ok
    for name, data in (("f", b"new"), ("g", b"new-g")):
        with store.open_file(7, name) as f:
            assert f.read() == data


def test_a_stale_writer_removes_nothing_of_a_step_the_newer_writer_is_writing(root):
    """The newer generation is writing step 7 (files there, no manifest yet) while the
    older one begins the same step, and while an older one that began before it is
    refused at its commit: neither removes the newer writer's files (on object stores
    both would have taken them for leftovers of their own step)."""
    url, options, _ = root
    store = CheckpointStore(url, options)
    first = store.take_lease("a")
    early = store.writer(7, lease=first)
    early.begin()
    early.add_bytes("e", b"early")
    with store.writer(7, lease=store.take_lease("b")) as new:
        new.add_bytes("f", b"new")
        with pytest.raises(StaleWriterError):
            store.writer(7, lease=first).begin()
        with pytest.raises(StaleWriterError):
            early.commit()
    assert store.steps() == [7] and store.verify(7).ok
    with store.open_file(7, "f") as f:
        assert f.read() == b"new"
