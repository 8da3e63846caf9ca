"""Atomic, verifiable checkpoint storage over fsspec (no TensorFlow here).

``CheckpointStore`` (:mod:`.store`) is the facade; the rooms behind it are
:mod:`.manifest` (the format and path validator), :mod:`.writer` (+ :mod:`.hashing`),
:mod:`.verify`, :mod:`.retention` and :mod:`.backends` (the two commit protocols).
"""

from forge_dist.storage.manifest import FORMAT, MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from forge_dist.storage.retention import DEFAULT_GRACE_S
from forge_dist.storage.store import CheckpointStore
from forge_dist.storage.types import (
    CheckpointInfo,
    CheckpointReport,
    GcReport,
    Problem,
    StagingInfo,
)
from forge_dist.storage.writer import CheckpointWriter

__all__ = [
    "DEFAULT_GRACE_S",
    "FORMAT",
    "MANIFEST_NAME",
    "CheckpointInfo",
    "CheckpointReport",
    "CheckpointStore",
    "CheckpointWriter",
    "FileEntry",
    "GcReport",
    "Manifest",
    "Problem",
    "StagingInfo",
    "parse_manifest",
]
