"""``ChiefCSVLogger``: one CSV of the epoch logs, written by the chief through fsspec."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from forge_dist.comm import Communicator
from forge_dist.errors import BackendNotInstalledError, ConfigurationError
from forge_dist.keras._compat import to_float
from forge_dist.keras.callbacks.base import ForgeCallback


class ChiefCSVLogger(ForgeCallback):
    """One CSV of the epoch logs, written by the chief through fsspec.

    The whole file is rewritten atomically each epoch (temp + rename on local disks,
    one PUT on object stores). With ``append=True`` a resumed run keeps the rows of the
    epochs before it and replaces any from the epoch it restarts at, so no epoch is
    listed twice."""

    state_key = "csv_logger"

    def __init__(
        self,
        url: str,
        separator: str = ",",
        append: bool = True,
        storage_options: dict[str, Any] | None = None,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(communicator)
        import fsspec

        if not isinstance(url, str) or not url:
            raise ConfigurationError("url must be a non-empty string")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ConfigurationError(f"separator must be one character, got {separator!r}")
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as e:
            raise BackendNotInstalledError(f"cannot write the CSV to {url}: {e}") from e
        self.url = url
        self.separator = separator
        self.append = append
        self.rows: list[dict[str, str]] = []
        self.header: list[str] | None = None
        self._first_epoch: int | None = None

    def on_train_begin(self, logs: Any = None) -> None:
        self.rows, self.header, self._first_epoch = [], None, None
        if self.comm.is_chief and self.append:
            self._read_existing()

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

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not self.comm.is_chief:
            return
        logs = logs or {}
        if self._first_epoch is None:
            self._first_epoch = epoch
            self.rows = [r for r in self.rows if int(float(r.get("epoch", -1))) < epoch]
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

    def _write(self) -> None:
        out = io.StringIO()
        w = csv.DictWriter(
            out, fieldnames=self.header, delimiter=self.separator, lineterminator="\n", restval=""
        )
        w.writeheader()
        w.writerows(self.rows)
        data = out.getvalue().encode("utf-8")
        parent = self.path.rsplit("/", 1)[0] if "/" in self.path else ""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol in ("file", "local"):
            os.makedirs(parent or ".", exist_ok=True)
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        else:
            self.fs.pipe_file(self.path, data)
