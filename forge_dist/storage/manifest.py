"""The ``manifest.json`` format (``forge-dist/1``) and the path validator.

Readers and writers use the same validator: a manifest that this module would
refuse to write is also refused when read. Only :class:`ManifestError` (and its
subclass :class:`UnsafePathError`) ever escape from parsing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from forge_dist.errors import ManifestError, UnsafePathError

FORMAT = "forge-dist/1"
MANIFEST_NAME = "manifest.json"
#: A manifest larger than this is refused before it is parsed.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: Sizes above this (1 PiB) are refused as nonsense rather than trusted.
MAX_FILE_SIZE = 2**50
MAX_PATH_LENGTH = 4096

STEP_DIGITS = 8
STEP_RE = re.compile(r"^step-(\d{8,})$")
#: ``step-N.tmp-<id>`` is a writer's staging; ``step-N.del-<id>`` a step being deleted.
STAGING_RE = re.compile(r"^step-(\d{8,})\.(tmp|del)-([A-Za-z0-9_.\-]{1,200})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_REQUIRED = ("format", "step", "created", "files")


def step_dirname(step: int) -> str:
    """``12 -> "step-00000012"``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ManifestError(f"step must be a non-negative integer, got {step!r}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a committed-folder name, or None if ``name`` is not one."""
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def validate_relpath(path: Any) -> str:
    """Check that ``path`` is a safe relative, ``/``-separated file path.

    Refused: non-strings, empty, absolute, ``.``/``..``/empty components,
    backslashes, NUL and other control characters, drive letters, the reserved
    name ``manifest.json`` at the top, and over-long paths.
    """
    if not isinstance(path, str):
        raise UnsafePathError(f"file path must be a string, got {type(path).__name__}")
    shown = path.encode("unicode_escape").decode("ascii")[:200]
    if not path:
        raise UnsafePathError("file path is empty")
    if len(path) > MAX_PATH_LENGTH:
        raise UnsafePathError(f"file path is longer than {MAX_PATH_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise UnsafePathError(f"file path {shown!r} contains NUL or a control character")
    if "\\" in path:
        raise UnsafePathError(f"file path {shown!r} contains a backslash; use '/'")
    if path.startswith("/"):
        raise UnsafePathError(f"file path {shown!r} is absolute; it must be relative")
    if _DRIVE.match(path):
        raise UnsafePathError(f"file path {shown!r} starts with a drive letter")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(
                f"file path {shown!r} has an empty, '.' or '..' component; "
                "it must stay inside the checkpoint"
            )
    if path == MANIFEST_NAME:
        raise UnsafePathError(f"{MANIFEST_NAME!r} is reserved for the manifest")
    return path


def _check_paths_consistent(paths: Iterable[str]) -> None:
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise ManifestError(f"duplicate file path {p!r} in manifest")
        seen.add(p)
    for p in seen:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise ManifestError(f"file path {p!r} lies under another listed file")


@dataclass(frozen=True)
class FileEntry:
    """One payload file: its relative path, size in bytes and sha256 (hex)."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def metric_to_json(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _metric_from_json(key: str, value: Any) -> float:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"metric {key!r} must be a number, got {value!r:.60}")
    return float(value)


def normalise_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as ``{str: float}``; anything else is a :class:`ManifestError`."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise ManifestError(f"metric names must be strings, got {key!r}")
        try:
            out[key] = float(value) if not isinstance(value, str) else _metric_from_json(key, value)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"metric {key!r} is not a number: {value!r:.60}") from e
    return out


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``."""

    step: int
    files: tuple[FileEntry, ...]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    writer: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    #: Which run wrote it: ``id`` (kept across resumes and requeues), ``name`` (the
    #: user's), ``slurm_job_id``, ``model_fingerprint``. Empty for steps put by hand.
    run: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        step_dirname(self.step)
        for entry in self.files:
            validate_relpath(entry.path)
        _check_paths_consistent(e.path for e in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "step": self.step,
            "created": self.created,
            "writer": dict(self.writer),
            "files": [e.to_json() for e in self.files],
            "metrics": {k: metric_to_json(v) for k, v in sorted(self.metrics.items())},
            "state": dict(self.state),
            "versions": dict(self.versions),
            "run": dict(self.run),
        }

    def to_bytes(self) -> bytes:
        try:
            text = json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"manifest state is not JSON-serialisable: {e}") from e
        return (text + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return parse_manifest(data)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ManifestError(f"manifest repeats the key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"manifest contains the non-JSON constant {name}")


def _parse_entry(i: int, raw: Any) -> FileEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"files[{i}] must be an object")
    for key in ("path", "size", "sha256"):
        if key not in raw:
            raise ManifestError(f"files[{i}] is missing {key!r}")
    path = validate_relpath(raw["path"])
    size = raw["size"]
    if isinstance(size, bool) or not isinstance(size, int):
        raise ManifestError(f"files[{i}] ({path}): size must be an integer, got {size!r:.40}")
    if size < 0:
        raise ManifestError(f"files[{i}] ({path}): size {size} is negative")
    if size > MAX_FILE_SIZE:
        raise ManifestError(f"files[{i}] ({path}): size {size} is implausibly large")
    digest = raw["sha256"]
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise ManifestError(f"files[{i}] ({path}): sha256 must be 64 lowercase hex digits")
    return FileEntry(path, size, digest)


def _load_json(data: bytes) -> dict[str, Any]:
    """The manifest's JSON object: bounded, UTF-8, no duplicate keys, no NaN constants."""
    if not isinstance(data, (bytes, bytearray)):
        raise ManifestError("manifest must be bytes")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest is not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        raw = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except ManifestError:
        raise
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON (truncated or damaged): {e}") from e
    if not isinstance(raw, dict):
        raise ManifestError("manifest must be a JSON object")
    return raw


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ManifestError(f"manifest {key!r} must be an object")
    return value


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; raise :class:`ManifestError` if invalid."""
    raw = _load_json(data)
    for key in _REQUIRED:
        if key not in raw:
            raise ManifestError(f"manifest is missing the required field {key!r}")
    if raw["format"] != FORMAT:
        raise ManifestError(
            f"unsupported manifest format {raw['format']!r:.60}; expected {FORMAT!r}"
        )
    step = raw["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ManifestError(f"manifest step must be a non-negative integer, got {step!r:.40}")
    created = raw["created"]
    if not isinstance(created, str):
        raise ManifestError("manifest 'created' must be an ISO-8601 string")
    try:
        datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError as e:
        raise ManifestError(f"manifest 'created' is not ISO-8601: {created!r:.60}") from e
    files = raw["files"]
    if not isinstance(files, list):
        raise ManifestError("manifest 'files' must be a list")
    entries = tuple(_parse_entry(i, f) for i, f in enumerate(files))
    _check_paths_consistent(e.path for e in entries)
    versions = _object(raw, "versions")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items()):
        raise ManifestError("manifest 'versions' must map names to version strings")
    return Manifest(
        step=step,
        files=entries,
        created=created,
        writer=_object(raw, "writer"),
        metrics={k: _metric_from_json(k, v) for k, v in _object(raw, "metrics").items()},
        state=_object(raw, "state"),
        versions=versions,
        run=_object(raw, "run"),
    )
