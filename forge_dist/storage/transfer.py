"""Copying a committed step from one store to another (another root, another kind of
storage): every byte is checked against the source manifest as it is read, and the copy
commits by the destination's own protocol, with the source's metrics, state and run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from forge_dist.errors import IntegrityError
from forge_dist.storage.types import CheckpointInfo

if TYPE_CHECKING:
    from forge_dist.storage.store import CheckpointStore


def copy_step(
    src: CheckpointStore, step: int, dst: CheckpointStore, replace: bool = False
) -> CheckpointInfo:
    """Copy committed ``step`` of ``src`` into ``dst``; a file that does not match the
    source manifest aborts the copy (nothing is committed in ``dst``)."""
    info = src.get(step)
    if info.manifest is None:
        raise IntegrityError(f"{info.name} in {src.display} is corrupt: {info.error}")
    m = info.manifest
    with dst.writer(
        m.step, metrics=m.metrics, state=m.state, writer=m.writer, run=m.run, replace=replace
    ) as w:
        for entry in m.files:
            with src.open_file(info.name, entry.path) as f:
                got = w.add_stream(entry.path, f)
            if (got.size, got.sha256) != (entry.size, entry.sha256):
                raise IntegrityError(
                    f"{info.name}/{entry.path} in {src.display} does not match its manifest "
                    f"(read {got.size} bytes, sha256 {got.sha256[:16]}…; expected "
                    f"{entry.size} bytes, {entry.sha256[:16]}…): not copied"
                )
    assert w.committed is not None
    return w.committed
