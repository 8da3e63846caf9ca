"""Weight files read in place (forge_dist/keras/h5read.py): the arrays come back equal,
as views into the one buffer the file was read into, from a ``.weights.h5`` file and
from a ``.keras`` archive; anything that cannot be read so is refused, never misread.
No TensorFlow here."""

from __future__ import annotations

import io
import zipfile

import h5py
import numpy as np
import pytest

from forge_dist.errors import IntegrityError
from forge_dist.keras.h5read import NotInPlace, arrays_in_place
from forge_dist.keras.h5stream import (
    WEIGHTS_IN_ARCHIVE,
    DatasetSpec,
    Skeleton,
    stream_weights,
    write_keras_archive,
)
from forge_dist.storage import CheckpointStore

RNG = np.random.default_rng(7)
ARRAYS = [
    RNG.normal(size=(33, 17)).astype("float32"),
    RNG.integers(0, 2**40, size=(5,)).astype("int64"),
    np.array(3, dtype="int64"),  # a scalar (an optimizer's iteration count)
    np.zeros((0, 4), "float32"),  # an empty one
    RNG.normal(size=(7,)).astype("float16"),
    RNG.integers(0, 2, size=(9,)).astype("bool"),
]
# Source 0 is stored twice (a variable shared by two layers).
SPECS = [
    DatasetSpec("layers/a/vars", "0", 0, (33, 17), "<f4"),
    DatasetSpec("layers/b/vars", "0", 0, (33, 17), "<f4"),
    DatasetSpec("layers/b/vars", "1", 1, (5,), "<i8"),
    DatasetSpec("optimizer/vars", "0", 2, (), "<i8"),
    DatasetSpec("optimizer/vars", "1", 3, (0, 4), "<f4"),
    DatasetSpec("layers/c/vars", "0", 4, (7,), "<f2"),
    DatasetSpec("layers/c/vars", "1", 5, (9,), "|b1"),
]
GROUPS = [("layers/a/vars", {}), ("layers/b/vars", {}), ("optimizer/vars", {"n": 2})]


def weight_file() -> bytearray:
    out = io.BytesIO()
    stream_weights(out.write, Skeleton.build(GROUPS, SPECS), ARRAYS)
    return bytearray(out.getvalue())


def archive(compression: int = zipfile.ZIP_STORED) -> bytearray:
    out = io.BytesIO()
    write_keras_archive(out, "{}", "{}", Skeleton.build(GROUPS, SPECS), ARRAYS)
    if compression == zipfile.ZIP_STORED:
        return bytearray(out.getvalue())
    # The same archive, its members deflated (as a zip tool might rewrite it).
    again = io.BytesIO()
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(again, "w", compression) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    return bytearray(again.getvalue())


def assert_same(got: list[np.ndarray], buf: bytearray) -> None:
    assert len(got) == len(ARRAYS)
    for a, b in zip(got, ARRAYS, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert np.shares_memory(got[0], np.frombuffer(buf, np.uint8)), "a view, not a copy"


def test_a_weight_file_is_read_in_place():
    buf = weight_file()
    assert_same(arrays_in_place(buf, False, SPECS, len(ARRAYS)), buf)


def test_a_keras_archive_is_read_in_place():
    buf = archive()
    assert_same(arrays_in_place(buf, True, SPECS, len(ARRAYS)), buf)


def test_a_weight_file_h5py_wrote_is_read_in_place():
    """Not only our own writer's files: an ordinary contiguous HDF5 file."""
    out = io.BytesIO()
    with h5py.File(out, "w") as f:
        for spec in SPECS:
            f.require_group(spec.group).create_dataset(spec.key, data=ARRAYS[spec.source])
    buf = bytearray(out.getvalue())
    got = arrays_in_place(buf, False, SPECS, len(ARRAYS))
    assert all(np.array_equal(a, b) for a, b in zip(got, ARRAYS, strict=True))


def refused(buf: bytearray, archive_: bool, specs=SPECS, sources: int | None = None) -> str:
    with pytest.raises(NotInPlace) as info:
        arrays_in_place(buf, archive_, specs, len(ARRAYS) if sources is None else sources)
    return str(info.value)


def test_what_cannot_be_read_in_place_is_refused():
    assert "compressed" in refused(archive(zipfile.ZIP_DEFLATED), True)
    assert "not a .keras archive" in refused(weight_file(), True)
    assert "not an HDF5" in refused(bytearray(b"x" * 4096), False)
    other = [SPECS[0], DatasetSpec("layers/a/vars", "0", 1, (17, 33), "<f4"), *SPECS[2:]]
    assert "the model's variable <f4[17, 33]" in refused(weight_file(), False, other)
    missing = [*SPECS, DatasetSpec("layers/z/vars", "0", 6, (1,), "<f4")]
    assert "no dataset layers/z/vars/0" in refused(weight_file(), False, missing, 7)
    assert "in no dataset" in refused(weight_file(), False, SPECS, len(ARRAYS) + 1)
    out = io.BytesIO()
    with h5py.File(out, "w") as f:
        f.create_group("layers/a/vars").create_dataset(
            "0", data=ARRAYS[0], chunks=(11, 17), compression="gzip"
        )
    assert "not stored contiguously" in refused(bytearray(out.getvalue()), False, SPECS[:1], 1)


def test_read_verified_reads_a_file_once_and_refuses_what_its_manifest_does_not_say(tmp_path):
    store = CheckpointStore(str(tmp_path / "root"))
    data = bytes(archive())
    with store.writer(3) as w:
        w.add_bytes("model.keras", data)
    assert store.read_verified(3, "model.keras") == data
    path = tmp_path / "root" / "step-00000003" / "model.keras"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    path.write_bytes(flipped)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.read_verified(3, "model.keras")
    path.write_bytes(data + b"!")
    with pytest.raises(IntegrityError, match=f"expected {len(data)} bytes, read {len(data) + 1}"):
        store.read_verified(3, "model.keras")
    path.write_bytes(data[:-1])
    with pytest.raises(IntegrityError, match=f"read {len(data) - 1}"):
        store.read_verified(3, "model.keras")
    with pytest.raises(IntegrityError, match="lists no file other"):
        store.read_verified(3, "other")
    assert WEIGHTS_IN_ARCHIVE in zipfile.ZipFile(io.BytesIO(data)).namelist()


def test_read_verified_hashes_a_file_of_many_chunks_in_order(tmp_path):
    """Past the read size (8 MiB), chunk k is hashed while chunk k+1 is read: a file of
    several chunks and a ragged end reads back whole, and a flipped byte in its last
    chunk is caught."""
    store = CheckpointStore(str(tmp_path / "root"))
    data = np.random.default_rng(1).integers(0, 256, 3 * 8 * 2**20 + 12345, "uint8").tobytes()
    with store.writer(1) as w:
        w.add_bytes("big", data)
    assert store.read_verified(1, "big") == data
    flipped = bytearray(data)
    flipped[-3] ^= 1
    (tmp_path / "root" / "step-00000001" / "big").write_bytes(flipped)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.read_verified(1, "big")


class Trickle(io.RawIOBase):
    """A stream that hands out at most ``most`` bytes a read (a socket, say)."""

    def __init__(self, data: bytes, most: int):
        super().__init__()
        self.data, self.pos, self.most = data, 0, most

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.most, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_read_all_hashed_takes_short_reads_as_they_come():
    import hashlib

    from forge_dist.storage.hashing import read_all_hashed

    data = np.random.default_rng(2).integers(0, 256, 5 * 2**20 + 3, "uint8").tobytes()
    for src in (Trickle(data, 2**20 + 7), Trickle(data, 10**9)):
        buf, size, digest = read_all_hashed(src, len(data))
        assert (bytes(buf), size, digest) == (data, len(data), hashlib.sha256(data).hexdigest())
    buf, size, _ = read_all_hashed(Trickle(data, 2**20), len(data) - 10)
    assert size == len(data) - 9, "a longer file reads as one byte more than expected"


@pytest.mark.parametrize("n", [0, 1, 8 * 2**20, 8 * 2**20 + 1, 3 * 8 * 2**20 + 5])
def test_a_local_file_read_by_several_reads_hashes_what_is_there_in_order(tmp_path, n):
    """A regular file is read by positional reads in flight: whatever its size against
    the manifest's (equal, one byte short, one byte long, a whole read past its end),
    the bytes, the count and the hash are those of reading it in order."""
    import hashlib

    from forge_dist.storage.hashing import read_all_hashed

    data = np.random.default_rng(n).integers(0, 256, n, "uint8").tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    for expected in {n, max(n - 1, 0), n + 1, n + 8 * 2**20}:
        with open(path, "rb", buffering=0) as f:
            buf, size, digest = read_all_hashed(f, expected)
        kept = data[:expected]
        assert size == len(kept) + (n > expected), (n, expected)
        assert digest == hashlib.sha256(kept).hexdigest(), (n, expected)
        assert bytes(buf[: len(kept)]) == kept and len(buf) == expected


def test_a_local_file_is_read_with_reads_in_flight_once_each(tmp_path, monkeypatch):
    """The first two reads of a step's file of several chunks are in flight at once
    (each waits here for the other: reading one at a time would break the barrier), and
    every byte is read once."""
    import os
    import threading

    store = CheckpointStore(str(tmp_path / "root"))
    data = np.random.default_rng(3).integers(0, 256, 5 * 8 * 2**20 + 7, "uint8").tobytes()
    with store.writer(1) as w:
        w.add_bytes("big", data)
    both = threading.Barrier(2, timeout=10)
    read: list[int] = []
    preadv = os.preadv

    def one_of_several(fd, buffers, offset):
        if len(read) < 2:
            read.append(0)
            both.wait()
        n = preadv(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", one_of_several)
    assert store.read_verified(1, "big") == data
    assert sum(read) == len(data), "every byte read once"
