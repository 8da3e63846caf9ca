"""Keras' weight files read in place: the arrays of a ``.weights.h5`` file or of a
``.keras`` archive's ``model.weights.h5``, as NumPy views into the one buffer the file
was read into (no temporary file, no second model, no copy).

h5py reads only the file's metadata, from the buffer, to find where each dataset's raw
bytes start; a dataset that is not stored contiguously and uncompressed (or an archive
member that is compressed) raises :class:`NotInPlace`, and the caller loads the file the
usual way. No TensorFlow here (h5py and NumPy only).
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
from collections.abc import Sequence

import numpy as np

from forge_dist.keras.h5stream import WEIGHTS_IN_ARCHIVE, DatasetSpec

_LOCAL_HEADER = b"PK\x03\x04"


class NotInPlace(Exception):
    """This file cannot be read in place (the reason says why)."""


class _BufferFile(io.RawIOBase):
    """A read-only, seekable file over a buffer (for zipfile and h5py)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(b), len(self._view) - self._pos))
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def weights_span(buf: memoryview, archive: bool) -> tuple[int, int]:
    """``(offset, length)`` of the weight file in ``buf``: all of it, or the stored (not
    compressed) ``model.weights.h5`` member of a ``.keras`` archive."""
    if not archive:
        return 0, len(buf)
    try:
        with zipfile.ZipFile(_BufferFile(buf)) as zf:
            info = zf.getinfo(WEIGHTS_IN_ARCHIVE)
    except (zipfile.BadZipFile, KeyError) as e:
        raise NotInPlace(f"not a .keras archive with {WEIGHTS_IN_ARCHIVE}: {e}") from e
    if info.compress_type != zipfile.ZIP_STORED:
        raise NotInPlace(f"{WEIGHTS_IN_ARCHIVE} is compressed in the archive")
    at = info.header_offset
    if bytes(buf[at : at + 4]) != _LOCAL_HEADER:
        raise NotInPlace("the archive's local header is not where its directory says")
    name_len, extra_len = struct.unpack("<HH", buf[at + 26 : at + 30])
    start = at + 30 + name_len + extra_len
    if start + info.file_size > len(buf):
        raise NotInPlace("the archive is shorter than its directory says")
    return start, info.file_size


def arrays_in_place(
    buf: memoryview | bytearray, archive: bool, datasets: Sequence[DatasetSpec], sources: int
) -> list[np.ndarray]:
    """One array per source (``datasets``' ``source`` numbers, ``0..sources-1``): views
    of the weight file's datasets in ``buf``, checked against each dataset's shape and
    dtype."""
    import h5py

    view = memoryview(buf)
    start, length = weights_span(view, archive)
    out: list[np.ndarray | None] = [None] * sources
    try:
        f = h5py.File(_BufferFile(view[start : start + length]), "r")
    except OSError as e:
        raise NotInPlace(f"not an HDF5 weight file: {e}") from e
    with f:
        for spec in datasets:
            ds = f.get(f"{spec.group}/{spec.key}")
            if not isinstance(ds, h5py.Dataset):
                raise NotInPlace(f"no dataset {spec.group}/{spec.key} in the weight file")
            if ds.shape != spec.shape or ds.dtype.str != spec.dtype:
                raise NotInPlace(
                    f"{spec.group}/{spec.key} is {ds.dtype.str}{list(ds.shape)}, the model's "
                    f"variable {spec.dtype}{list(spec.shape)}"
                )
            count = math.prod(spec.shape)
            if count == 0:
                array = np.empty(spec.shape, spec.dtype)
            else:
                offset = ds.id.get_offset()
                if ds.chunks is not None or ds.compression is not None or offset is None:
                    raise NotInPlace(f"{spec.group}/{spec.key} is not stored contiguously")
                nbytes = count * np.dtype(spec.dtype).itemsize
                if offset + nbytes > length:
                    raise NotInPlace(f"{spec.group}/{spec.key} runs past the weight file")
                array = np.frombuffer(buf, spec.dtype, count, start + offset).reshape(spec.shape)
            out[spec.source] = array
    missing = [i for i, a in enumerate(out) if a is None]
    if missing:
        raise NotInPlace(f"variables {missing[:5]} are in no dataset")
    return [a for a in out if a is not None]
