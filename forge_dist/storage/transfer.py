"""Copying committed steps out of a store: into another store (another root, another
kind of storage: every byte checked against the source manifest as it is read, the copy
committed by the destination's own protocol with the source's metrics, state and run),
or into a local folder (``download``: verified while copied, complete or not at all)."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from forge_dist.errors import IntegrityError, NoCheckpointError, StorageError
from forge_dist.storage.backends import writer_id
from forge_dist.storage.hashing import Progress, copy_hashed
from forge_dist.storage.types import CheckpointInfo
from forge_dist.storage.verify import content_problem

if TYPE_CHECKING:
    from forge_dist.storage.lease import Lease
    from forge_dist.storage.store import CheckpointStore


def copy_step(
    src: CheckpointStore,
    step: int,
    dst: CheckpointStore,
    replace: bool = False,
    lease: Lease | None = None,
) -> CheckpointInfo:
    """Copy committed ``step`` of ``src`` into ``dst``; a file that does not match the
    source manifest aborts the copy (nothing is committed in ``dst``). With ``lease``
    it commits only while that writer generation holds ``dst``."""
    info = src.get(step)
    if info.manifest is None:
        raise IntegrityError(f"{info.name} in {src.display} is corrupt: {info.error}")
    m = info.manifest
    with dst.writer(
        m.step,
        metrics=m.metrics,
        state=m.state,
        writer=m.writer,
        run=m.run,
        replace=replace,
        created=m.created,  # a copy is the same checkpoint: when it was taken stays
        lease=lease,
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


def download(
    store: CheckpointStore,
    step: int | None,
    dest: str | os.PathLike[str],
    progress: Progress | None = None,
) -> str:
    """Copy a committed step (newest intact one if ``step`` is None) into the local
    folder ``dest``, hashing as it goes. ``dest`` must not exist or be empty; it
    appears complete or not at all."""
    info = _downloadable(store, step)
    assert info.manifest is not None
    dest = os.path.abspath(os.fspath(dest))
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise StorageError(f"download destination {dest} exists and is not empty")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    partial = f"{dest}.partial-{writer_id()}"
    os.mkdir(partial)
    try:
        problems = []
        for entry in info.manifest.files:
            target = os.path.join(partial, *entry.path.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with store.open_file(info.name, entry.path) as src, open(target, "wb") as out:
                problem = content_problem(entry, *copy_hashed(src, out.write, progress))
            if problem is not None:
                problems.append(problem)
        if problems:
            raise IntegrityError(
                f"{info.name} in {store.display} failed verification while downloading: "
                + "; ".join(f"{p.path}: {p.message}" for p in problems),
                problems,
            )
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest


def _downloadable(store: CheckpointStore, step: int | None) -> CheckpointInfo:
    """The step to download, checked for presence and sizes first."""
    if step is None:
        info = store.newest(verify="fast")
        if info is None:
            raise NoCheckpointError(f"no intact committed checkpoint in {store.display}")
    else:
        info = store.get(step)
    if info.manifest is None:
        raise IntegrityError(f"{info.name} in {store.display} is corrupt: {info.error}")
    bad = [p for p in store.verify(info.name, full=False).problems if p.fatal]
    if bad:
        raise IntegrityError(
            f"{info.name} in {store.display} is corrupt: "
            + "; ".join(f"{p.path}: {p.message}" for p in bad),
            bad,
        )
    return info
