"""Two commit protocols behind one interface (docs/DESIGN.md, "Commit protocols").

* :class:`~.posix.PosixBackend` — local disks, NFS, Lustre: stage, fsync, rename.
* :class:`~.objects.ObjectBackend` — any other fsspec filesystem (s3, gs, memory, ...):
  payload first, ``manifest.json`` last as one single-object PUT.

:func:`make_backend` picks one for a URL.
"""

from __future__ import annotations

from typing import Any

from forge_dist.errors import BackendNotInstalledError, StorageError
from forge_dist.storage._errors import describe
from forge_dist.storage.backends.base import Backend, FileStat, Sink, owner_is_dead, writer_id
from forge_dist.storage.backends.objects import ObjectBackend
from forge_dist.storage.backends.posix import PosixBackend

#: The extra that installs the fsspec implementation of a protocol.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def make_backend(url: str, storage_options: dict[str, Any] | None, display: str) -> Backend:
    """Pick the commit protocol for ``url``: rename on POSIX, manifest-last elsewhere."""
    import fsspec

    options = dict(storage_options or {})
    if url.split("://", 1)[0] in ("s3", "s3a"):
        options = _s3_options(options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        extra = EXTRAS.get(protocol)
        hint = (
            f"pip install 'forge-dist[{extra}]'"
            if extra
            else f"install the fsspec implementation for {protocol!r}"
        )
        raise BackendNotInstalledError(
            f"the {protocol!r} storage backend is not installed ({e}); {hint}"
        ) from e
    except (ValueError, TypeError) as e:
        raise StorageError(f"cannot open {display}: {describe(e)}") from e
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return PosixBackend(path, display)
    return ObjectBackend(fs, path, display)


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """The store's S3 client validates no GET's checksum itself unless the options say
    so: every byte the store reads (verify, download, copy) is hashed against the
    manifest's sha256, and botocore's check of the same bytes (a CRC-32, or a second
    sha256 for objects uploaded with theirs) ran on the one event-loop thread every
    transfer shares (~30 % of it in a verify, profiled)."""
    try:
        from botocore.config import Config
    except ImportError:  # s3fs missing: make_backend says so
        return options
    config = dict(options.get("config_kwargs") or {})
    if "response_checksum_validation" in Config.OPTION_DEFAULTS:
        config.setdefault("response_checksum_validation", "when_required")
    return {**options, "config_kwargs": config}


__all__ = [
    "Backend",
    "FileStat",
    "ObjectBackend",
    "PosixBackend",
    "Sink",
    "make_backend",
    "owner_is_dead",
    "writer_id",
]
