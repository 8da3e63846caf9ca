"""``ChiefCSVLogger``: one CSV of the epoch logs, written by the chief through fsspec."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import ConfigurationError
from forge_dist.keras._compat import to_float
from forge_dist.keras._state import registry, restored_position
from forge_dist.keras.callbacks.base import ForgeCallback, keras_alias
from forge_dist.storage._errors import storage_errors
from forge_dist.storage.logdir import is_local, open_url, probe_writable


class ChiefCSVLogger(ForgeCallback):
    """One CSV of the epoch logs, written by the chief through fsspec.

    ``url`` (Keras' ``filename``) is any fsspec URL. The whole file is rewritten
    atomically each epoch (temp + rename on local disks, one PUT on object stores),
    with the values every rank agreed on; a failure to write is an error on every rank
    in that epoch. As in Keras, ``append=False`` replaces an existing file and
    ``append=True`` adds this fit's rows after the ones there, which it never drops; a
    value missing from an epoch's logs is written ``NA``. (Unlike Keras, the file is
    replaced at the first epoch's end, not at train begin, so a fit refused before its
    first step loses no rows.)

    A resume of the same run (``restore_latest``, or ``fit_resumed``'s fits) keeps the
    rows, whatever ``append`` says: each checkpoint records how many rows the CSV holds,
    and a resumed run first drops the rows written after the restored checkpoint, so
    every epoch has exactly one row."""

    state_key = "csv_logger"

    def __init__(
        self,
        url: str | None = None,
        separator: str = ",",
        append: bool = False,
        storage_options: dict[str, Any] | None = None,
        communicator: Communicator | None = None,
        filename: str | None = None,
    ) -> None:
        super().__init__(communicator)
        url = keras_alias("url", url, "filename", filename)
        if not isinstance(separator, str) or len(separator) != 1:
            raise ConfigurationError(f"separator must be one character, got {separator!r}")
        self.fs, self.path = open_url(url, storage_options, "the CSV url")
        self.url = url
        self.separator = separator
        self.append = append
        self.rows: list[dict[str, str]] = []
        self.header: list[str] | None = None
        self.last_epoch = -1
        self._restores_seen = 0
        self._restored_rows: int | None = None  # rows the restored checkpoint covers

    # -- the state protocol: how far the CSV goes (recorded in each manifest)
    def get_state(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "rows": len(self.rows)}

    def set_state(self, state: dict[str, Any], weights: list[Any] | None = None) -> None:
        rows = state.get("rows")
        self._restored_rows = rows if isinstance(rows, int) else None

    def reset_state(self) -> None:
        self._restored_rows = None

    # -- Keras hooks
    def state_id(self) -> str:
        return f"{self.state_key}[{str(self.url).rstrip('/').rsplit('/', 1)[-1]}]"

    def train_begin(self, logs: Any = None) -> None:
        self.begin_state()
        self._agree("ChiefCSVLogger(train begin)", self._start)

    def _start(self) -> None:
        """Chief: probe the URL; the rows this fit goes on from."""
        parent = self.path.rsplit("/", 1)[0] if "/" in self.path else "."
        probe_writable(self.fs, parent, self.url, "the CSV's folder")
        if registry(self.model).keep_state:
            return  # fit_resumed's next fit of the same run: the rows as they are
        position = restored_position(self.model, self._restores_seen)
        self.rows, self.header = [], None
        if position is not None:  # a resume: this run's rows, cut back to the checkpoint
            last_complete, _step, self._restores_seen = position
            self._read_existing()
            self.rows = _cut(self.rows, self._restored_rows, last_complete)
        elif self.append:
            self._read_existing()
        self.last_epoch = max([_epoch(r) for r in self.rows], default=-1)

    def _read_existing(self) -> None:
        """Chief: the rows already in the file (a resumed run appends to them)."""
        try:
            text = self.fs.cat_file(self.path).decode("utf-8")
        except FileNotFoundError:
            return
        if text.strip():
            reader = csv.DictReader(io.StringIO(text), delimiter=self.separator)
            self.header = list(reader.fieldnames or [])
            self.rows = list(reader)

    def epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._agree(f"ChiefCSVLogger(epoch {epoch + 1})", lambda: self._add(epoch, logs or {}))

    def _add(self, epoch: int, logs: dict[str, Any]) -> None:
        """Chief: this epoch's row after the others."""
        row = {"epoch": str(epoch)}
        for k in sorted(logs):
            f = to_float(logs[k])
            row[k] = repr(f) if f is not None else str(logs[k])
        if self.header is None:
            self.header = list(row)
        else:
            self.header += [k for k in row if k not in self.header]
        self.rows.append(row)
        self._write()
        self.last_epoch = epoch

    def _write(self) -> None:
        out = io.StringIO()
        w = csv.DictWriter(
            out, fieldnames=self.header, delimiter=self.separator, lineterminator="\n", restval="NA"
        )
        w.writeheader()
        w.writerows(self.rows)
        data = out.getvalue().encode("utf-8")
        with storage_errors(f"cannot write the CSV {self.url}"):
            if not is_local(self.fs):
                self.fs.pipe_file(self.path, data)  # one PUT
                return
            parent = os.path.dirname(self.path) or "."
            os.makedirs(parent, exist_ok=True)
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)


def _cut(rows: list[dict[str, str]], covered: int | None, last_complete: int) -> list:
    """The rows a resume keeps: the ``covered`` rows the checkpoint recorded, and of
    those written after it, the ones of epochs it completed (a logger after the
    checkpoint in the list wrote its epoch's row after the checkpoint was taken). A
    checkpoint that recorded no count (older ones): every row up to its epoch."""
    if covered is None:
        return [r for r in rows if _epoch(r) <= last_complete]
    return rows[:covered] + [r for r in rows[covered:] if _epoch(r) <= last_complete]


def _epoch(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("epoch", -1)))
    except ValueError:
        return -1
