"""Two commit protocols behind one interface (docs/DESIGN.md, "Commit protocols").

* :class:`~.posix.PosixBackend` — local disks, NFS, Lustre: stage, fsync, rename.
* :class:`~.objects.ObjectBackend` — any other fsspec filesystem (gs, az, memory, ...):
  payload first, ``manifest.json`` last as one single-object PUT; subclassed per cloud
  where its API does better (:class:`~.s3.S3Backend`, :class:`~.azure.AzureBackend`,
  :class:`~.gcs.GCSBackend`).

:func:`make_backend` picks one for a URL from :data:`PROTOCOLS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from forge_dist.errors import BackendNotInstalledError, StorageError
from forge_dist.storage._errors import describe
from forge_dist.storage.backends.base import Backend, FileStat, Sink, owner_is_dead, writer_id
from forge_dist.storage.backends.objects import ObjectBackend
from forge_dist.storage.backends.posix import PosixBackend


@dataclass(frozen=True)
class Protocol:
    """How the store meets one URL protocol: its backend (``module:Class`` under this
    package, imported when used), the forge-dist extra that installs its fsspec
    implementation, and that implementation's package."""

    backend: str = "objects:ObjectBackend"
    extra: str | None = None
    package: str | None = None

    def backend_class(self) -> type[Backend]:
        module, name = self.backend.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)


_POSIX = Protocol("posix:PosixBackend")
_S3 = Protocol("s3:S3Backend", "s3", "s3fs")
_GCS = Protocol("gcs:GCSBackend", "gcs", "gcsfs")
_AZURE = Protocol("azure:AzureBackend", "azure", "adlfs")

#: Protocol -> backend, like fsspec's own registry (names, imported when used). A
#: protocol not here goes through the generic object backend.
PROTOCOLS: dict[str, Protocol] = {
    "file": _POSIX,
    "local": _POSIX,
    "s3": _S3,
    "s3a": _S3,
    "gs": _GCS,
    "gcs": _GCS,
    "az": _AZURE,
    "abfs": _AZURE,
    "abfss": _AZURE,
}

#: The extra that installs the fsspec implementation of a protocol.
EXTRAS = {name: p.extra for name, p in PROTOCOLS.items() if p.extra}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def make_backend(url: str, storage_options: dict[str, Any] | None, display: str) -> Backend:
    """Pick the commit protocol for ``url``: rename on POSIX, manifest-last elsewhere."""
    import fsspec

    entry = PROTOCOLS.get(_protocol(url), Protocol())
    options = entry.backend_class().prepare_options(dict(storage_options or {}))
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        protocol = _protocol(url)
        hint = (
            f"pip install 'forge-dist[{entry.extra}]'"
            if entry.extra
            else f"install the fsspec implementation for {protocol!r}"
        )
        raise BackendNotInstalledError(
            f"the {protocol!r} storage backend is not installed ({e}); {hint}"
        ) from e
    except (ValueError, TypeError) as e:
        raise StorageError(f"cannot open {display}: {describe(e)}") from e
    # The filesystem's own protocol decides (a chained or aliased URL may differ).
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    cls = PROTOCOLS.get(protocol, Protocol()).backend_class()
    if cls is PosixBackend:
        return PosixBackend(path, display)
    if not cls.accepts(fs):
        cls = ObjectBackend
    return cls(fs, path, display)


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
