"""CheckpointStore against local disk, ``memory://`` and a real S3 endpoint: writing,
listing, reading back."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from storehelp import commit, raw, sha

from forge_dist.errors import (
    CheckpointExistsError,
    ConfigurationError,
    IntegrityError,
    ManifestError,
    NoCheckpointError,
    StorageError,
)
from forge_dist.storage import MANIFEST_NAME


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


@pytest.mark.parametrize("behind", [False, True], ids=["hash-inline", "hash-behind"])
def test_open_hashes_what_a_serializer_writes(target, behind):
    store = target.store()
    big = os.urandom(20 * 1024 * 1024)  # large enough for the pipelined path
    chunks = [memoryview(big)[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20)]
    with store.writer(1) as w, w.open("archive.bin", hash_behind=behind) as f:
        assert not f.seekable()
        f.write(b"head")
        for c in chunks if behind else [memoryview(big)]:  # (views of one stable buffer)
            f.write(c)
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


def test_info_and_is_committed_tell_committed_from_staged_and_corrupt(target):
    store = target.store()
    commit(store, 1, {"a": b"a"})
    assert store.is_committed("step-00000001") and not store.is_committed("step-00000009")
    info = store.info("step-00000001")
    assert info.readable and info.step == 1 and info.manifest.files[0].path == "a"
    assert store.info("step-00000009") is None
    fs, root = raw(target)
    fs.pipe_file(f"{root}/step-00000001/{MANIFEST_NAME}", b"{not json")
    bad = store.info("step-00000001")
    assert store.is_committed("step-00000001") and not bad.readable and "JSON" in bad.error
    assert not store.is_intact(bad, verify=None)


def test_is_intact_checks_as_much_as_asked(target):
    store = target.store()
    commit(store, 1, {"a": b"aaaa"})
    fs, root = raw(target)
    fs.pipe_file(f"{root}/step-00000001/a", b"bbbb")  # same size, other bytes
    info = store.get(1)
    assert store.is_intact(info, verify=None) and store.is_intact(info, verify="fast")
    assert not store.is_intact(info, verify="full")
    with pytest.raises(ConfigurationError, match="verify must be"):
        store.is_intact(info, verify="deep")


def test_delete_uncommits_one_step(target):
    store = target.store()
    for step in (1, 2):
        commit(store, step, {"a": b"a"})
    store.delete(1)
    assert store.steps() == [2] and store.list_staging() == []
    with pytest.raises(NoCheckpointError):
        store.delete(1)


def test_remove_staging_never_removes_a_committed_step(target):
    store = target.store()
    commit(store, 1, {"a": b"a"})
    with pytest.raises(ConfigurationError, match="committed"):
        store.remove_staging("step-00000001")
    with pytest.raises(ConfigurationError, match="not a staging"):
        store.remove_staging("history.csv")
    assert store.steps() == [1]
