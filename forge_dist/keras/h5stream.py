"""Keras' weight files written straight from arrays, at the speed of a copy.

Keras writes ``model.weights.h5`` through h5py into an in-memory file, then copies that
into the ``.keras`` zip: two extra copies of every byte, all holding the interpreter
lock. Here the HDF5 file's *skeleton* (superblock, groups, attributes, dataset headers)
is made once with h5py, every dataset allocated contiguously at a fixed offset and never
filled; a save then streams the skeleton's bytes and each array's raw bytes in file order
into any writable file object (the store's hashing writer), inside a zip entry for a
``.keras`` archive. The result is an ordinary HDF5 file: ``keras.models.load_model`` and
h5py read it as if Keras had written it. No TensorFlow here (h5py and NumPy only).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from forge_dist.keras.stored_zip import StoredZip

#: A save writes at most this much in one call (crc32, sha256 and the write of one chunk
#: stay in the CPU's cache, and the interpreter lock is taken once a chunk).
CHUNK = 4 * 1024 * 1024

#: What Keras 3 names the parts of a ``.keras`` archive.
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_IN_ARCHIVE = "model.weights.h5"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the weight file: ``group/key``, filled from array ``source``."""

    group: str
    key: str
    source: int
    shape: tuple[int, ...]
    dtype: str  # NumPy's str, e.g. "<f4"


@dataclass(frozen=True)
class Skeleton:
    """An HDF5 file as pieces in file order: ``bytes`` (the skeleton's own) or
    ``(source, nbytes)`` (the raw bytes of that source array)."""

    pieces: tuple[bytes | tuple[int, int], ...]
    size: int

    @classmethod
    def build(
        cls,
        groups: Sequence[tuple[str, dict[str, Any]]],
        datasets: Sequence[DatasetSpec],
    ) -> Skeleton:
        """Make the file once (sparse: the data regions are never written) and keep
        everything but the data regions."""
        import h5py

        fd, path = tempfile.mkstemp(prefix="forge-dist-skeleton-", suffix=".h5")
        os.close(fd)
        try:
            with h5py.File(path, "w") as f:
                for name, attrs in groups:
                    g = f.require_group(name)
                    for k, v in attrs.items():
                        g.attrs[k] = v
                for d in datasets:
                    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                    ds = f.require_group(d.group).create_dataset(
                        d.key, shape=d.shape, dtype=np.dtype(d.dtype), dcpl=dcpl
                    )
                    if d.shape == ():  # HDF5 allocates a scalar's storage on first write
                        ds[()] = np.zeros((), d.dtype)
            regions = []
            with h5py.File(path, "r") as f:
                for d in datasets:
                    nbytes = int(np.prod(d.shape, dtype=np.int64)) * np.dtype(d.dtype).itemsize
                    offset = f[d.group][d.key].id.get_offset()
                    if nbytes == 0:
                        continue
                    if offset is None:  # pragma: no cover - h5py always allocated it early
                        raise ValueError(f"{d.group}/{d.key} has no contiguous storage")
                    regions.append((int(offset), nbytes, d.source))
            return cls._from_file(path, sorted(regions))
        finally:
            os.remove(path)

    @classmethod
    def _from_file(cls, path: str, regions: list[tuple[int, int, int]]) -> Skeleton:
        size = os.path.getsize(path)
        pieces: list[bytes | tuple[int, int]] = []
        pos = 0
        with open(path, "rb") as f:
            for offset, nbytes, source in regions:
                if offset < pos or offset + nbytes > size:
                    raise ValueError("overlapping or out-of-file dataset regions")
                f.seek(pos)
                if offset > pos:
                    pieces.append(f.read(offset - pos))
                pieces.append((source, nbytes))
                pos = offset + nbytes
            f.seek(pos)
            if size > pos:
                pieces.append(f.read(size - pos))
        return cls(tuple(pieces), size)

    def chunks(self, arrays: Sequence[np.ndarray]) -> Iterator[memoryview]:
        """The file's bytes in order, as views (no copy) of at most :data:`CHUNK`; an
        array of another size than its dataset's is refused before anything is yielded."""
        flats = {}
        for piece in self.pieces:
            if isinstance(piece, tuple):
                source, nbytes = piece
                flat = np.ascontiguousarray(arrays[source]).reshape(-1).view(np.uint8)
                if flat.nbytes != nbytes:
                    raise ValueError(
                        f"array {source} has {flat.nbytes} bytes of a {nbytes}-byte dataset"
                    )
                flats[source] = memoryview(flat)
        for piece in self.pieces:
            if isinstance(piece, bytes):
                yield memoryview(piece)
                continue
            flat = flats[piece[0]]
            for start in range(0, len(flat), CHUNK):
                yield flat[start : start + CHUNK]


def stream_weights(write: Callable[[Any], Any], skeleton: Skeleton, arrays: Sequence[Any]) -> None:
    """Write the HDF5 weight file through ``write``."""
    for view in skeleton.chunks(arrays):
        write(view)


def write_keras_archive(
    fileobj: IO[bytes],
    config_json: str,
    metadata_json: str,
    skeleton: Skeleton,
    arrays: Sequence[Any],
    crc_behind: bool = True,
) -> None:
    """A ``.keras`` archive as Keras 3 lays it out (metadata, config, the weight file;
    stored, not compressed) into a writable, possibly unseekable, file object. The
    arrays must stay unchanged until this returns (with ``crc_behind`` their CRC is
    computed on a helper thread behind the writes)."""
    with StoredZip(fileobj, crc_behind) as z:
        z.add(METADATA_FILE, [metadata_json.encode()])
        z.add(CONFIG_FILE, [config_json.encode()])
        z.add(WEIGHTS_IN_ARCHIVE, skeleton.chunks(arrays))
