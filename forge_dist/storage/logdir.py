"""A log folder at any fsspec URL, written locally and mirrored (TensorBoard's events).

Writers append to files in a local folder: ``url`` itself when it is local, else a
scratch folder of this process. :meth:`LogDir.mirror` copies each new or grown file to
the URL in one piece (one PUT on object stores; a temporary name and a move
elsewhere), so a reader never sees a half-uploaded file and a lost node loses only
what was written since the last mirror. Nothing is created before it is used, so a
rank that never writes leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from forge_dist._urls import redact_url
from forge_dist.errors import BackendNotInstalledError, ConfigurationError, StorageError
from forge_dist.storage._errors import describe, storage_errors
from forge_dist.storage.backends import EXTRAS, writer_id
from forge_dist.storage.backends.base import PROBE_PREFIX

OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss")


def open_url(url: str, storage_options: dict[str, Any] | None, what: str) -> tuple[Any, str]:
    """``(filesystem, path)`` for ``url``; a missing backend is a clear error."""
    import fsspec

    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"{what} must be a non-empty string, got {url!r}")
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        protocol = url.split("://", 1)[0]
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'forge-dist[{extra}]'" if extra else f"install fsspec's {protocol!r}"
        raise BackendNotInstalledError(f"cannot write {what} {url}: {e}; {hint}") from e
    except (ValueError, TypeError) as e:
        raise StorageError(f"cannot open {what} {redact_url(url)}: {describe(e)}") from e


def is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def is_object_store(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in OBJECT_STORES


def probe_writable(fs: Any, path: str, display: str, what: str) -> None:
    """Create ``path`` if needed, write and remove a small file in it; a clear
    :class:`StorageError` naming ``what`` and the URL otherwise."""
    probe = f"{path.rstrip('/')}/{PROBE_PREFIX}{writer_id()}"
    with storage_errors(f"{what} {display} is not writable"):
        if is_local(fs):
            os.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)


class LogDir:
    """``url``'s files, written in :attr:`local` and mirrored to ``url``."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, what: str) -> None:
        self.fs, self.path = open_url(url, storage_options, what)
        self.url, self.display, self.what = url, redact_url(url), what
        self.remote = not is_local(self.fs)
        self._local: str | None = None if self.remote else os.path.abspath(self.path)
        self._uploaded: dict[str, tuple[int, int]] = {}

    @property
    def local(self) -> str:
        """The local folder writers write to (made on first use)."""
        if self._local is None:
            self._local = tempfile.mkdtemp(prefix="forge-dist-logs-")
        os.makedirs(self._local, exist_ok=True)
        return self._local

    def probe(self) -> None:
        probe_writable(self.fs, self.path, self.display, self.what)

    def _remote_path(self, rel: str) -> str:
        return f"{self.path.rstrip('/')}/{rel}"

    def _put(self, local: str, remote: str) -> None:
        if is_object_store(self.fs):
            self.fs.put_file(local, remote)  # one object, visible complete or not at all
            return
        tmp = f"{remote}.tmp-{writer_id()}"
        self.fs.put_file(local, tmp)
        self.fs.mv(tmp, remote)

    def mirror(self) -> list[str]:
        """Copy every new or grown local file to the URL; return what was copied."""
        if not self.remote or self._local is None:
            return []
        copied = []
        with storage_errors(f"cannot copy logs to {self.what} {self.display}"):
            for dirpath, _dirs, files in os.walk(self._local):
                for name in files:
                    full = os.path.join(dirpath, name)
                    st = os.stat(full)
                    rel = os.path.relpath(full, self._local).replace(os.sep, "/")
                    if self._uploaded.get(rel) == (st.st_size, st.st_mtime_ns):
                        continue
                    self._put(full, self._remote_path(rel))
                    self._uploaded[rel] = (st.st_size, st.st_mtime_ns)
                    copied.append(rel)
        return copied

    def rewrite_each(self, rewrite: Callable[[str], bool], match: str = "events.out") -> int:
        """Apply ``rewrite(local_path) -> changed`` to every file under the URL whose
        name contains ``match``; changed files replace the originals atomically.
        Return how many changed."""
        changed = 0
        with storage_errors(f"cannot rewrite the logs in {self.what} {self.display}"):
            if not self.remote:
                for dirpath, _dirs, files in os.walk(self.local):
                    for name in files:
                        if match in name and rewrite(os.path.join(dirpath, name)):
                            changed += 1
                return changed
            if not self.fs.exists(self.path):
                return 0
            scratch = tempfile.mkdtemp(prefix="forge-dist-logs-rewrite-")
            try:
                for remote in self.fs.find(self.path):
                    if match not in remote.rsplit("/", 1)[-1]:
                        continue
                    local = os.path.join(scratch, "f")
                    self.fs.get_file(remote, local)
                    if rewrite(local):
                        self._put(local, remote)
                        changed += 1
                    os.unlink(local)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return changed
