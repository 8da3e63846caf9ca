"""What every command shares: exit codes, the usage error, ``--storage-options``, and
telling a checkpoint root from one checkpoint folder (docs/DESIGN.md, "The CLI contract")."""

from __future__ import annotations

import json
from typing import Any

from forge_dist.errors import ConfigurationError

EXIT_OK, EXIT_INTEGRITY, EXIT_ERROR, EXIT_NO_CHECKPOINT = 0, 1, 2, 3


class UsageError(ConfigurationError):
    """A bad command line: one line on stderr, exit 2."""


def storage_options(text: str | None, flag: str = "--storage-options") -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object")
    return value


def open_store(url: str, options_text: str | None, flag: str = "--storage-options") -> Any:
    from forge_dist.storage import CheckpointStore

    return CheckpointStore(url, storage_options(options_text, flag))


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
    whole = CheckpointStore(url, options)  # a bad URL is reported whole, as given
    split = split_url(url)
    if split is not None:
        parent, base = split
        if STEP_RE.match(base) or STAGING_RE.match(base):
            return CheckpointStore(parent, options), base
        try:
            parent_store = CheckpointStore(parent, options)
            if parent_store.is_committed(base):
                return parent_store, base
        except ForgeDistError:
            pass
    return whole, None


def resolve_step(url: str, options_text: str | None, step: int | None) -> tuple[Any, Any]:
    """``(store, info)`` of one committed step: URL is a step folder, or a root with
    ``--step N`` (default: the newest). A missing step is a NoCheckpointError (exit 3)."""
    from forge_dist.errors import NoCheckpointError
    from forge_dist.storage.manifest import step_dirname

    store, name = resolve(url, options_text)
    if name is not None:
        if step is not None:
            raise UsageError("--step needs a checkpoint root, not one checkpoint folder")
    elif step is not None:
        name = step_dirname(step)
    else:
        infos = store.list()
        if not infos:
            raise NoCheckpointError(f"no committed checkpoint in {store.display}")
        name = infos[-1].name
    info = store.info(name)
    if info is None:
        raise NoCheckpointError(f"no committed {name} in {store.display}")
    return store, info


def positive(name: str, value: int | None) -> int | None:
    """A count given on the command line: a positive integer (or absent)."""
    if value is not None and value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")
    return value
