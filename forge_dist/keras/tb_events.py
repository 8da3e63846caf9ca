"""TensorBoard event files, written and cut back with the ``tensorboard`` package alone
(no TensorFlow): scalars as ``simple_value`` summaries, read back by TensorBoard's own
loader."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from forge_dist.errors import BackendNotInstalledError

#: Tags whose step is the optimizer's iteration; every other tag's step is the epoch.
ITERATION_TAGS = ("batch_", "evaluation_")


def _tb() -> Any:
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as e:
        raise BackendNotInstalledError(
            f"ChiefTensorBoard needs the tensorboard package ({e}): pip install 'forge-dist[tf]'"
        ) from e
    return event_pb2, summary_pb2, EventFileWriter


class ScalarWriter:
    """One event file in ``folder``, created on the first scalar."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._writer: Any = None

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        event_pb2, summary_pb2, EventFileWriter = _tb()
        summary = summary_pb2.Summary()
        for tag, value in sorted(values.items()):
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            summary.value.add(tag=tag, simple_value=number)
        if not summary.value:
            return
        if self._writer is None:
            os.makedirs(self.folder, exist_ok=True)
            self._writer = EventFileWriter(self.folder)
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def keep_event(event: Any, epoch: int, step: int) -> bool:
    """Whether ``event`` lies at or before the restored ``epoch`` / iteration ``step``.
    Events without values (the file version, graphs) are kept."""
    if not event.HasField("summary") or not event.summary.value:
        return True
    tag = event.summary.value[0].tag
    limit = step if tag.startswith(ITERATION_TAGS) else epoch
    return event.step <= limit


def read_events(path: str, migrate: bool = False) -> list[Any]:
    """Every event in the file, as written (or, ``migrate``, as TensorBoard's own reader
    upgrades them: ``simple_value`` scalars become tensors)."""
    from tensorboard.backend.event_processing import event_file_loader as loader

    cls = loader.EventFileLoader if migrate else loader.LegacyEventFileLoader
    return list(cls(path).Load())


def truncate_events(path: str, epoch: int, step: int) -> bool:
    """Drop from the event file at ``path`` every value past the restored ``epoch``
    (epoch-stepped tags) or iteration ``step`` (``batch_*``, ``evaluation_*``);
    rewrite it atomically if anything goes. Return whether it changed."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    events = read_events(path)
    kept = [e for e in events if keep_event(e, epoch, step)]
    if len(kept) == len(events):
        return False
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        writer = RecordWriter(f)
        for e in kept:
            writer.write(e.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def scalar_values(folder: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the event files under
    ``folder`` (for tests and tools), in file then record order."""
    from tensorboard.util import tensor_util

    out: dict[str, list[tuple[int, float]]] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            for e in read_events(os.path.join(dirpath, name), migrate=True):
                for v in e.summary.value if e.HasField("summary") else []:
                    if v.HasField("simple_value"):
                        value = v.simple_value
                    elif v.HasField("tensor"):
                        arr = tensor_util.make_ndarray(v.tensor)
                        if arr.size != 1 or arr.dtype.kind not in "fiu":
                            continue  # text, histograms, images
                        value = float(arr.reshape(()))
                    else:
                        continue
                    out.setdefault(v.tag, []).append((e.step, value))
    return out


__all__ = ["ScalarWriter", "keep_event", "scalar_values", "truncate_events"]
