"""LogDir: logs written locally and mirrored to any fsspec URL, each file in one piece."""

from __future__ import annotations

import os

import pytest

from forge_dist.errors import StorageError
from forge_dist.storage.logdir import LogDir


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_mirror_copies_new_and_grown_files_only(kind, s3, tmp_path):
    url, options = (
        (f"memory://logs-{os.getpid()}/{tmp_path.name}", None)
        if kind == "memory"
        else (f"s3://{s3.bucket}/logs/{tmp_path.name}", s3.options)
    )
    log = LogDir(url, options, "log_dir")
    log.probe()
    path = os.path.join(log.local, "train", "events.out.1")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"a" * 10)
    assert log.mirror() == ["train/events.out.1"]
    assert log.mirror() == []  # unchanged: not copied again
    with open(path, "ab") as f:
        f.write(b"b")
    assert log.mirror() == ["train/events.out.1"]
    assert log.fs.cat_file(f"{log.path}/train/events.out.1") == b"a" * 10 + b"b"
    assert not [p for p in log.fs.find(log.path) if ".tmp-" in p or "probe" in p]


def test_a_local_log_dir_is_written_in_place_and_never_mirrored(tmp_path):
    log = LogDir(str(tmp_path / "logs"), None, "log_dir")
    assert log.local == str(tmp_path / "logs") and log.mirror() == []


def test_nothing_is_created_before_it_is_used(tmp_path):
    LogDir(str(tmp_path / "logs"), None, "log_dir")
    LogDir(f"memory://unused-{os.getpid()}/x", None, "log_dir")
    assert not (tmp_path / "logs").exists()


def test_an_unwritable_log_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="/file/logs is not writable: .*Not a directory"):
        LogDir(str(blocker / "logs"), None, "log_dir").probe()


def test_rewrite_each_replaces_changed_files_atomically(tmp_path):
    log = LogDir(f"memory://rw-{os.getpid()}/{tmp_path.name}", None, "log_dir")
    log.fs.pipe_file(f"{log.path}/a/events.out.x", b"keep")
    log.fs.pipe_file(f"{log.path}/b/events.out.y", b"cut me")
    log.fs.pipe_file(f"{log.path}/b/other.txt", b"cut me")

    def cut(path: str) -> bool:
        with open(path, "rb") as f:
            if b"cut" not in f.read():
                return False
        with open(path, "wb") as f:
            f.write(b"cut")
        return True

    assert log.rewrite_each(cut) == 1
    assert log.fs.cat_file(f"{log.path}/b/events.out.y") == b"cut"
    assert log.fs.cat_file(f"{log.path}/b/other.txt") == b"cut me"
