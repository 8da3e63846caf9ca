"""POSIX-only behaviour: links, permissions, full disks and cross-device renames."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
from storehelp import commit

from forge_dist.errors import (
    BackendNotInstalledError,
    ConfigurationError,
    StorageError,
)
from forge_dist.policy import Retention
from forge_dist.storage import MANIFEST_NAME, CheckpointStore
from forge_dist.storage.backends import posix as backends_mod


def test_root_problems_are_clear_errors(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        CheckpointStore(str(tmp_path / "missing")).list()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        CheckpointStore(str(tmp_path / "afile")).list()
    with (
        pytest.raises(StorageError, match="not a directory"),
        CheckpointStore(str(tmp_path / "afile")).writer(1) as w,
    ):
        w.add_bytes("a", b"x")
    assert (tmp_path / "afile").read_text() == "x"


def test_file_url_and_plain_path_are_the_same_root(tmp_path):
    commit(CheckpointStore(f"file://{tmp_path}/r"), 1, {"a": b"x"})
    assert CheckpointStore(str(tmp_path / "r")).steps() == [1]
    assert CheckpointStore(str(tmp_path / "r")).uses_rename


def test_missing_backend_names_the_extra(without_gcsfs):
    with pytest.raises(BackendNotInstalledError, match=r"forge-dist\[gcs\]"):
        CheckpointStore("gs://bucket/run")


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ConfigurationError):
        CheckpointStore("")
    with pytest.raises(ConfigurationError):
        CheckpointStore("/tmp/x", storage_options="key=1")  # type: ignore[arg-type]


def test_symlinks_pointing_outside_are_never_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not read me")
    root = tmp_path / "root"
    store = CheckpointStore(str(root))
    commit(store, 1, {"model.bin": b"0123456789ABCD", "sub/x.bin": b"abc"})
    ck = root / "step-00000001"
    # Replace a listed file by a link of the same size to a file outside.
    (ck / "model.bin").unlink()
    (ck / "model.bin").symlink_to(secret)
    # And a listed folder by a link to a folder outside.
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    (outside_dir / "x.bin").write_bytes(b"abc")
    os.rename(ck / "sub", tmp_path / "moved-sub")
    (ck / "sub").symlink_to(outside_dir)

    reads = []
    real_open = backends_mod.PosixBackend.open_read

    def spy(self, name, rel):
        reads.append(rel)
        return real_open(self, name, rel)

    backends_mod.PosixBackend.open_read = spy
    try:
        report = store.verify(1)
    finally:
        backends_mod.PosixBackend.open_read = real_open
    kinds = {(p.kind, p.path) for p in report.problems if p.fatal}
    assert kinds == {("unsafe_path", "model.bin"), ("unsafe_path", "sub/x.bin")}
    assert reads == [], "nothing behind a link may be opened"
    assert store.newest() is None
    store.gc(Retention(keep_last=1), grace_s=0)
    assert secret.read_bytes() == b"do not read me"
    assert (outside_dir / "x.bin").read_bytes() == b"abc"


def test_a_manifest_pointing_outside_is_rejected_and_nothing_outside_is_touched(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    root = tmp_path / "root"
    store = CheckpointStore(str(root))
    commit(store, 1, {"a": b"x"})
    commit(store, 2, {"a": b"x"})
    manifest = root / "step-00000001" / MANIFEST_NAME
    doc = json.loads(manifest.read_text())
    doc["files"].append({"path": "../../victim.bin", "size": 8, "sha256": "0" * 64})
    manifest.write_text(json.dumps(doc))
    report = store.verify(1)
    assert report.problems[0].kind == "bad_manifest"
    store.gc(Retention(keep_last=1))
    assert victim.read_bytes() == b"precious"
    # The corrupt step is left for a person to inspect, not deleted.
    assert (root / "step-00000001").is_dir()


def test_no_space_left_raises_and_keeps_the_previous_checkpoint(tmp_path):
    from mounts import tmpfs

    with tmpfs(tmp_path / "small", "1m") as mnt:  # a real full disk
        store = CheckpointStore(str(mnt / "root"))
        commit(store, 1, {"a": b"previous"})
        with (
            pytest.raises(StorageError, match="no space left on device") as exc,
            store.writer(2) as w,
        ):
            w.add_bytes("big.bin", os.urandom(2_000_000))
        assert exc.value.errno == errno.ENOSPC
        assert store.steps() == [1]
        assert store.verify(1, strict=True).ok
        assert store.list_staging() == []
        assert shutil.disk_usage(mnt).used < 200_000, "the failed staging's bytes are freed"


def test_rename_across_devices_raises_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "root"))
    commit(store, 1, {"a": b"previous"})
    real_rename = os.rename

    def exdev(src, dst):
        if os.path.basename(dst).startswith("step-00000002"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(backends_mod.os, "rename", exdev)
    with pytest.raises(StorageError, match="EXDEV"), store.writer(2) as w:
        w.add_bytes("a", b"new")
    monkeypatch.undo()
    assert store.steps() == [1]
    assert store.verify(1, strict=True).ok
    assert store.list_staging() == []


def test_add_tree_refuses_symlinks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.bin").write_bytes(b"1")
    (src / "link").symlink_to("/etc/hostname")
    store = CheckpointStore(str(tmp_path / "root"))
    with pytest.raises(ConfigurationError, match="symbolic link"), store.writer(1) as w:
        w.add_tree(src)
    assert store.list() == [] and store.list_staging() == []


def test_staging_of_a_dead_local_writer_is_recognised(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "root"
    code = (
        "from forge_dist.storage import CheckpointStore\n"
        f"w = CheckpointStore({str(root)!r}).writer(5)\n"
        "w.begin(); w.add_bytes('a', b'x')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    store = CheckpointStore(str(root))
    (st,) = store.list_staging()
    assert st.owner_dead and st.kind == "tmp"
    # Young, but its writer is gone: gc removes it without waiting for the grace period.
    report = store.gc(grace_s=3600)
    assert report.removed_staging == [st.name]
