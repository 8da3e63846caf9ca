"""Atomic, verifiable checkpoint storage over fsspec (no TensorFlow here)."""

from forge_dist.storage.manifest import FORMAT, MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from forge_dist.storage.store import (
    CheckpointInfo,
    CheckpointReport,
    CheckpointStore,
    CheckpointWriter,
    GcReport,
    Problem,
    StagingInfo,
)

__all__ = [
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
