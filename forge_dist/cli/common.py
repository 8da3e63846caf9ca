"""What every command shares: exit codes, the usage error, ``--storage-options``, and
telling a checkpoint root from one checkpoint folder (docs/DESIGN.md, "The CLI")."""

from __future__ import annotations

import json
from typing import Any

from forge_dist.errors import ConfigurationError

EXIT_OK, EXIT_INTEGRITY, EXIT_ERROR, EXIT_NO_CHECKPOINT = 0, 1, 2, 3


class UsageError(ConfigurationError):
    """A bad command line: one line on stderr, exit 2."""


def storage_options(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--storage-options is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError("--storage-options must be a JSON object")
    return value


def open_store(url: str, options_text: str | None) -> Any:
    from forge_dist.storage import CheckpointStore

    return CheckpointStore(url, storage_options(options_text))


def split_url(url: str) -> tuple[str, str] | None:
    """``(parent, basename)`` of a URL or path, or None if it has no parent."""
    stripped = url.rstrip("/")
    scheme, sep, rest = stripped.partition("://")
    if not sep:
        scheme, rest = "", stripped
    if "/" not in rest.strip("/"):
        return None
    parent, base = rest.rsplit("/", 1)
    if not parent and not sep:
        parent = "/"
    return (f"{scheme}://{parent}" if sep else parent), base


def resolve(url: str, options_text: str | None) -> tuple[Any, str | None]:
    """``(store, checkpoint name or None)``: URL is a root or one checkpoint folder."""
    from forge_dist.errors import ForgeDistError
    from forge_dist.storage import CheckpointStore
    from forge_dist.storage.manifest import STAGING_RE, STEP_RE

    options = storage_options(options_text)
    split = split_url(url)
    if split is not None:
        parent, base = split
        if STEP_RE.match(base) or STAGING_RE.match(base):
            return CheckpointStore(parent, options), base
        parent_store = CheckpointStore(parent, options)
        try:
            if parent_store.is_committed(base):
                return parent_store, base
        except ForgeDistError:
            pass
    return CheckpointStore(url, options), None
