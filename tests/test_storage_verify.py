"""Verification and corrupt steps, against local disk, ``memory://`` and S3."""

from __future__ import annotations

import logging
import os

import pytest
from storehelp import commit, raw

from forge_dist.errors import (
    IntegrityError,
)
from forge_dist.storage import MANIFEST_NAME


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
