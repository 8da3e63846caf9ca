"""Store helpers shared by the storage and CLI tests."""

from __future__ import annotations

import hashlib
from typing import Any

import fsspec


def raw(target: Any) -> tuple[Any, str]:
    """The filesystem under the store, for tampering the way a crash or a person would."""
    fs, root = fsspec.core.url_to_fs(target.url, **(target.options or {}))
    return fs, root.rstrip("/")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit(store: Any, step: int, files: dict[str, bytes], **kw: Any) -> Any:
    """Commit ``files`` (name -> bytes) as ``step``; return what was committed."""
    with store.writer(step, **kw) as w:
        for rel, data in files.items():
            w.add_bytes(rel, data)
    return w.committed
