"""One file at any fsspec URL, replaced atomically, and the sidecar that verifies it.

Keras' ``ModelCheckpoint("models/best_model.keras")`` writes one file (or one per name
a template makes); :class:`~forge_dist.keras.ChiefModelCheckpoint` given such a path
writes the same files, through :class:`FileTarget`:

* the bytes go to a temporary name beside the file (local disks: written, fsynced,
  renamed over the file, the folder fsynced) or to the object in one PUT (object stores),
  so a reader sees the previous file or the new one, never a torn one;
* ``<file>.manifest.json`` (the *sidecar*, format ``forge-dist-file/1``) records the
  file's size and sha256 with the epoch, step and metrics it was saved at. It is
  replaced *before* the file, and keeps the records of the files it replaces
  (``previous``): after a crash between the two replacements the file still matches one
  record, and :func:`check_file` says which.

:func:`check_file` is what ``forge-dist verify <file>`` runs.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from forge_dist._urls import redact_url
from forge_dist.errors import ManifestError
from forge_dist.storage import _faults
from forge_dist.storage._errors import storage_errors
from forge_dist.storage.backends import writer_id
from forge_dist.storage.hashing import hash_stream
from forge_dist.storage.logdir import is_local, open_url, probe_writable
from forge_dist.storage.manifest import metric_to_json
from forge_dist.storage.types import CheckpointReport, Problem

SIDECAR = ".manifest.json"
FORMAT = "forge-dist-file/1"
#: Records of replaced files a sidecar keeps (a crash can leave the file one behind).
KEEP_PREVIOUS = 2


def sidecar_of(path: str) -> str:
    return path + SIDECAR


class HashingWriter(io.RawIOBase):
    """A write-only binary file that hashes what goes through it (not seekable, as
    Keras' savers and zipfile accept)."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._raw.write(view)
        self._hash.update(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class FileTarget:
    """Writes ``url`` (a file) atomically, with its sidecar."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, self.path = open_url(url, storage_options, "checkpoint file")
        self.url, self.display = url, redact_url(url)
        self.local = is_local(self.fs)

    @property
    def folder(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else "."

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def probe(self) -> None:
        """The folder can be written (made if needed)."""
        probe_writable(self.fs, self.folder, redact_url(self.url.rsplit("/", 1)[0]), "folder")

    def read_sidecar(self) -> dict[str, Any] | None:
        """The sidecar as written, or None when there is none."""
        try:
            raw = self.fs.cat_file(sidecar_of(self.path))
        except FileNotFoundError:
            return None
        return parse_sidecar(raw, self.display)

    def write(self, produce: Callable[[BinaryIO], None], meta: dict[str, Any]) -> dict[str, Any]:
        """``produce(f)`` writes the file's bytes into ``f``; they replace the file at the
        URL, recorded (with ``meta``) in the sidecar. Returns the sidecar."""
        with storage_errors(f"cannot write {self.display}"):
            if self.local:
                os.makedirs(self.folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{self.name}.tmp-", dir=self.folder)
            else:
                fd, tmp = tempfile.mkstemp(prefix="forge-dist-file-")
            try:
                if self.local:  # mkstemp makes 0600: the file gets what open() would give
                    os.fchmod(fd, 0o666 & ~_umask())
                with os.fdopen(fd, "wb") as raw:
                    out = HashingWriter(raw)
                    produce(out)
                    raw.flush()
                    os.fsync(raw.fileno())
                old = self.read_sidecar()
                earlier = [] if old is None else [_record(old), *old.get("previous", [])]
                record = {
                    "format": FORMAT,
                    "file": self.name,
                    "size": out.size,
                    "sha256": out.hexdigest(),
                    "created": _now(),
                    **meta,
                    "previous": earlier[:KEEP_PREVIOUS],
                }
                self._put_bytes(sidecar_of(self.path), _dump(record))
                _faults.point("file.sidecar_written")
                if self.local:
                    os.replace(tmp, self.path)
                    _fsync_folder(self.folder)
                else:
                    self.fs.put_file(tmp, self.path)  # one object: whole or not at all
                _faults.point("file.replaced")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return record

    def _put_bytes(self, path: str, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{writer_id()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)  # (read by setting; put back at once)
    os.umask(mask)
    return mask


def _record(sidecar: dict[str, Any]) -> dict[str, Any]:
    keep = ("size", "sha256", "created", "epoch", "step")
    return {k: sidecar[k] for k in keep if k in sidecar}


def _dump(record: dict[str, Any]) -> bytes:
    metrics = record.get("metrics")
    if isinstance(metrics, dict):  # NaN and infinities as the manifest writes them
        record = {**record, "metrics": {k: metric_to_json(v) for k, v in metrics.items()}}
    return json.dumps(record, indent=1, allow_nan=False).encode() + b"\n"


def _fsync_folder(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_sidecar(raw: bytes, display: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"the sidecar of {display} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"the sidecar of {display} is not a {FORMAT} record")
    for key, kind in (("size", int), ("sha256", str)):
        if not isinstance(data.get(key), kind):
            raise ManifestError(f"the sidecar of {display} lacks a valid {key!r}")
    previous = data.get("previous", [])
    if not isinstance(previous, list) or not all(isinstance(p, dict) for p in previous):
        raise ManifestError(f"the sidecar of {display} has an invalid 'previous'")
    return data


@dataclass
class FileCheck:
    """What :func:`check_file` found: a report as ``verify`` gives for a step (one file),
    whether any complete save of the file exists, and a note when the file holds the
    save before the newest (a save cut off between its two replacements)."""

    report: CheckpointReport
    sidecar: dict[str, Any] | None = None
    committed: bool = True
    note: str | None = None


def check_file(
    url: str, storage_options: dict[str, Any] | None = None, full: bool = True
) -> FileCheck:
    """Check the file at ``url`` against its sidecar: its size (``full=False``) or its
    size and sha256."""
    target = FileTarget(url, storage_options)
    name = target.name
    report = CheckpointReport(name, None, "full" if full else "fast")

    def fail(kind: str, message: str, **kw: Any) -> FileCheck:
        report.problems.append(Problem(kind, name, message, **kw))
        return FileCheck(report, sidecar, committed=kind != "uncommitted")

    sidecar: dict[str, Any] | None = None
    with storage_errors(f"cannot read {target.display}"):
        try:
            sidecar = target.read_sidecar()
        except ManifestError as e:
            return fail("bad_manifest", str(e))
        if sidecar is None:
            return fail("uncommitted", f"no sidecar {name}{SIDECAR}: not written by forge_dist")
        report.step = sidecar.get("step") if isinstance(sidecar.get("step"), int) else None
        records = [sidecar, *sidecar.get("previous", [])]
        try:
            size = int(target.fs.size(target.path))
        except FileNotFoundError:
            if len(records) > 1:
                return fail("missing", "file is missing", expected=sidecar["size"])
            return fail("uncommitted", "the file was never written (its first save did not end)")
        if full:
            with target.fs.open(target.path, "rb") as f:
                size, digest = hash_stream(f)
            report.bytes_checked = size
            match = [r for r in records if r.get("sha256") == digest and r.get("size") == size]
        else:
            match = [r for r in records if r.get("size") == size]
        report.files_checked = 1
        if not match:
            if sidecar["size"] != size or not full:
                return fail(
                    "size_mismatch",
                    f"size {size}, expected {sidecar['size']}",
                    expected=sidecar["size"],
                    actual=size,
                )
            return fail(
                "hash_mismatch", "sha256 differs", expected=sidecar["sha256"], actual=digest
            )
    note = None
    if match[0] is not sidecar:
        epoch = match[0].get("epoch")
        when = f" (epoch {epoch + 1})" if isinstance(epoch, int) else ""
        note = f"the newest save did not end; the file holds the one before it{when}, intact"
    return FileCheck(report, sidecar, note=note)
