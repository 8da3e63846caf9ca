"""What the store reports: listed steps, staging, verification results, gc results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forge_dist.storage.manifest import Manifest


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint. ``fatal=False`` only for unlisted files
    when not verifying strictly."""

    kind: str  # bad_manifest | missing | size_mismatch | hash_mismatch | unsafe_path |
    #            not_a_file | unlisted | io_error | uncommitted | previous_save (a file
    #            holding the save before its sidecar's newest: not fatal)
    path: str | None
    message: str
    expected: Any = None
    actual: Any = None
    fatal: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "message": self.message,
            "expected": self.expected,
            "actual": self.actual,
            "fatal": self.fatal,
        }


@dataclass
class CheckpointReport:
    """The result of verifying one checkpoint folder."""

    name: str
    step: int | None
    mode: str  # "fast" | "full"
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "step": self.step,
            "mode": self.mode,
            "ok": self.ok,
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed step as listed: its manifest, or why it could not be read."""

    name: str
    step: int
    manifest: Manifest | None
    error: str | None = None

    @property
    def readable(self) -> bool:
        return self.manifest is not None

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.manifest.metrics if self.manifest else {}

    @property
    def state(self) -> Mapping[str, Any]:
        return self.manifest.state if self.manifest else {}


@dataclass(frozen=True)
class StagingInfo:
    """An unfinished save (``tmp``), an interrupted delete (``del``), an object-store
    prefix without a manifest (``uncommitted``), or a local step folder whose manifest is
    gone (``orphan``: damage, kept for a person to look at)."""

    name: str
    step: int | None
    kind: str
    age_s: float | None
    owner_dead: bool


@dataclass
class GcReport:
    deleted_steps: list[int] = field(default_factory=list)
    kept_steps: list[int] = field(default_factory=list)
    removed_staging: list[str] = field(default_factory=list)
    kept_staging: list[str] = field(default_factory=list)
    dry_run: bool = False
