"""The same store suite against local disk, ``memory://`` and a real S3 endpoint."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import fsspec
import pytest

from forge_dist.errors import (
    CheckpointExistsError,
    IntegrityError,
    ManifestError,
    NoCheckpointError,
    StorageError,
)
from forge_dist.storage import MANIFEST_NAME, CheckpointStore


def raw(target):
    """The filesystem under the store, for tampering the way a crash or a person would."""
    fs, root = fsspec.core.url_to_fs(target.url, **(target.options or {}))
    return fs, root.rstrip("/")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit(store: CheckpointStore, step: int, files: dict[str, bytes], **kw):
    with store.writer(step, **kw) as w:
        for rel, data in files.items():
            w.add_bytes(rel, data)
    return w.committed


def test_commit_hashes_every_file_and_reads_back(target, payload, tmp_path):
    store = target.store()
    with store.writer(7, metrics={"val_loss": 0.25}, state={"wait": 1}) as w:
        w.add_tree(payload, prefix="tree/")
        w.add_file("model.bin", payload / "model.bin")
        w.add_stream("stream.bin", io.BytesIO(b"streamed" * 1000))
        w.add_bytes("deep/a/b/c.json", b"{}")
    info = store.get(7)
    files = {e.path: e for e in info.manifest.files}
    assert set(files) == {
        "tree/model.bin",
        "tree/sub/opt.bin",
        "tree/empty.txt",
        "model.bin",
        "stream.bin",
        "deep/a/b/c.json",
    }
    model = (payload / "model.bin").read_bytes()
    assert files["model.bin"].size == len(model)
    assert files["model.bin"].sha256 == sha(model)
    assert files["tree/empty.txt"].sha256 == sha(b"")
    assert files["stream.bin"].sha256 == sha(b"streamed" * 1000)
    assert info.metrics == {"val_loss": 0.25}
    assert info.state == {"wait": 1}
    assert [c.step for c in store.list()] == [7]
    assert store.list_staging() == []

    report = store.verify(7)
    assert report.ok, report.problems
    assert report.files_checked == 6
    assert report.bytes_checked == sum(e.size for e in info.manifest.files)

    dest = store.download(7, tmp_path / "out")
    assert (Path(dest) / "model.bin").read_bytes() == model
    assert (Path(dest) / "tree" / "sub" / "opt.bin").read_bytes() == (
        payload / "sub" / "opt.bin"
    ).read_bytes()


def test_exception_in_block_commits_nothing(target):
    store = target.store()
    commit(store, 1, {"a": b"one"})
    with pytest.raises(RuntimeError, match="boom"), store.writer(2) as w:
        w.add_bytes("a", b"two")
        raise RuntimeError("boom")
    assert [c.step for c in store.list()] == [1]
    assert store.list_staging() == []
    assert store.newest().step == 1
    assert store.verify(1).ok


def test_a_committed_step_is_never_overwritten_unless_asked(target):
    store = target.store()
    commit(store, 3, {"a": b"original"}, metrics={"m": 1.0})
    with pytest.raises(CheckpointExistsError, match="replace=True"):
        commit(store, 3, {"a": b"intruder"})
    info = store.get(3)
    assert info.metrics == {"m": 1.0}
    assert store.verify(3).ok
    assert store.list_staging() == []

    commit(store, 3, {"b": b"replacement"}, metrics={"m": 2.0}, replace=True)
    info = store.get(3)
    assert [e.path for e in info.manifest.files] == ["b"]
    assert info.metrics == {"m": 2.0}
    assert store.verify(3, strict=True).ok  # the old file "a" is gone


def test_staging_is_invisible_until_commit(target):
    store = target.store()
    commit(store, 1, {"a": b"1"})
    w = store.writer(2)
    w.begin()
    w.add_bytes("a", b"2" * 1000)
    other = target.store()
    assert [c.step for c in other.list()] == [1]
    assert other.newest().step == 1
    assert [s.step for s in other.list_staging()] == [2]
    w.commit()
    assert other.newest().step == 2


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete", "extra"])
def test_verify_reports_damaged_payload(target, damage):
    store = target.store()
    data = os.urandom(10_000)
    commit(store, 4, {"model.bin": data, "other.bin": b"x" * 10})
    fs, root = raw(target)
    path = f"{root}/step-00000004/model.bin"
    if damage == "truncate":
        fs.pipe_file(path, data[:-1])
    elif damage == "bitflip":
        fs.pipe_file(path, data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    elif damage == "delete":
        fs.rm_file(path)
    else:
        fs.pipe_file(f"{root}/step-00000004/extra.bin", b"surprise")
    fs.invalidate_cache()

    report = store.verify(4)
    kinds = {(p.kind, p.path) for p in report.problems}
    if damage == "extra":
        assert kinds == {("unlisted", "extra.bin")}
        assert report.ok, "an unlisted file is a warning unless strict"
        assert not store.verify(4, strict=True).ok
        return
    assert not report.ok
    expected = {"truncate": "size_mismatch", "bitflip": "hash_mismatch", "delete": "missing"}
    assert kinds == {(expected[damage], "model.bin")}
    fast = store.verify(4, full=False)
    # Fast mode sees presence and sizes, not a same-size bit flip.
    assert fast.ok == (damage == "bitflip")


def test_readers_skip_a_corrupt_newest_step(target, caplog):
    store = target.store()
    commit(store, 1, {"a": b"good"}, metrics={"val_loss": 0.5})
    commit(store, 2, {"a": b"good too"}, metrics={"val_loss": 0.1})
    commit(store, 3, {"a": b"will be damaged"}, metrics={"val_loss": 0.3})
    fs, root = raw(target)
    fs.pipe_file(f"{root}/step-00000003/a", b"xx")
    fs.pipe_file(f"{root}/step-00000002/a", b"good to!")  # same size, different bytes
    fs.invalidate_cache()
    with caplog.at_level(logging.WARNING, logger="forge_dist.storage"):
        assert store.newest(verify="fast").step == 2
        assert store.newest(verify="full").step == 1
    assert any("step-00000003" in r.message for r in caplog.records)
    assert store.best("val_loss", "min", verify="full").step == 1
    assert store.best("val_loss", "min", verify=None).step == 2


@pytest.mark.parametrize(
    "manifest, message",
    [
        (b"not json at all", "not valid JSON"),
        (b'{"format": "forge-dist/1", "step": 5, "created": "2026-', "not valid JSON"),
        (
            b'{"format": "other/9", "step": 5, "created": "2026-01-01T00:00:00", "files": []}',
            "unsupported manifest format",
        ),
        (
            b'{"format": "forge-dist/1", "step": 6, "created": "2026-01-01T00:00:00", "files": []}',
            "step 6",
        ),
    ],
)
def test_a_bad_manifest_makes_the_step_corrupt(target, manifest, message):
    store = target.store()
    commit(store, 4, {"a": b"fine"})
    commit(store, 5, {"a": b"fine"})
    fs, root = raw(target)
    fs.pipe_file(f"{root}/step-00000005/{MANIFEST_NAME}", manifest)
    fs.invalidate_cache()
    listed = {c.step: c for c in store.list()}
    assert not listed[5].readable and message in listed[5].error
    report = store.verify(5)
    assert not report.ok
    assert report.problems[0].kind == "bad_manifest"
    assert message in report.problems[0].message
    assert store.newest().step == 4
    with pytest.raises(IntegrityError):
        store.download(5, "/nonexistent-never-created")


def test_retention_keeps_last_and_best_and_always_the_newest(target):
    store = target.store()
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.4, 5: 0.8, 6: 0.7}
    for step, loss in losses.items():
        commit(store, step, {"w": str(step).encode()}, metrics={"val_loss": loss})
    kept, deleted = store.apply_retention(keep_last=2, keep_best=1, monitor="val_loss")
    assert kept == [2, 5, 6]
    assert deleted == [1, 3, 4]
    assert store.steps() == [2, 5, 6]
    assert all(store.verify(s).ok for s in store.steps())
    assert store.list_staging() == []
    # keep_last=1 alone still keeps the newest only.
    store.apply_retention(keep_last=1)
    assert store.steps() == [6]


def test_gc_removes_abandoned_staging_but_not_a_live_writer(target):
    store = target.store()
    commit(store, 1, {"a": b"1"})
    live = store.writer(2)
    live.begin()
    live.add_bytes("a", b"in progress")
    report = target.store().gc(grace_s=3600)
    assert report.removed_staging == []
    assert len(report.kept_staging) == 1
    live.add_bytes("b", b"more")
    live.commit()
    assert store.verify(2, strict=True).ok

    abandoned = store.writer(3)
    abandoned.begin()
    abandoned.add_bytes("a", b"never committed")
    dry = target.store().gc(grace_s=0, dry_run=True)
    assert len(dry.removed_staging) == 1 and len(store.list_staging()) == 1
    report = target.store().gc(grace_s=0)
    assert len(report.removed_staging) == 1
    assert store.list_staging() == []
    assert store.steps() == [1, 2]


def test_download_refuses_a_non_empty_destination(target, tmp_path):
    store = target.store()
    commit(store, 1, {"a": b"1"})
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="not empty"):
        store.download(1, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_download_of_a_damaged_step_leaves_nothing(target, tmp_path):
    store = target.store()
    commit(store, 1, {"a": b"12345678"})
    fs, root = raw(target)
    fs.pipe_file(f"{root}/step-00000001/a", b"12345679")
    fs.invalidate_cache()
    with pytest.raises(IntegrityError, match="sha256"):
        store.download(1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def test_an_empty_root_has_no_checkpoint(target):
    if target.kind == "local":
        os.makedirs(target.url)  # a missing local root is an error, tested elsewhere
    store = target.store()
    assert store.list() == []
    assert store.newest() is None
    with pytest.raises(NoCheckpointError):
        store.get(1)
    with pytest.raises(NoCheckpointError):
        store.download(None, "/tmp/never-used-dest")


def test_bad_paths_are_refused_by_the_writer(target):
    store = target.store()
    with pytest.raises(ManifestError), store.writer(1) as w:
        w.add_bytes("../escape", b"x")
    with pytest.raises(ManifestError), store.writer(1) as w:
        w.add_bytes("a", b"x")
        w.add_bytes("a", b"y")
    assert store.list() == []
    assert store.list_staging() == []


def test_open_hashes_what_a_serializer_writes(target):
    store = target.store()
    big = os.urandom(20 * 1024 * 1024)  # large enough for the pipelined path
    with store.writer(1) as w, w.open("archive.bin") as f:
        assert not f.seekable()
        f.write(b"head")
        f.write(memoryview(big))
        f.write(bytearray(b"tail"))
        assert f.tell() == len(big) + 8
    (entry,) = store.get(1).manifest.files
    assert entry.size == len(big) + 8
    assert entry.sha256 == sha(b"head" + big + b"tail")
    assert store.verify(1).ok


def test_an_error_inside_open_commits_nothing(target):
    store = target.store()
    with pytest.raises(RuntimeError), store.writer(1) as w, w.open("a.bin") as f:
        f.write(b"partial")
        raise RuntimeError("serializer crashed")
    assert store.list() == [] and store.list_staging() == []
