"""Real filesystems for fault tests: a tmpfs of a given size, read-only or remounted
read-only later (as root; skipped where mounting is not allowed)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: ``96k``, ``1m``) at ``path``, made here and
    unmounted on the way out."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], timeout=30)
    if out.returncode != 0:
        pytest.skip("this machine does not let us mount a tmpfs")
    try:
        yield path
    finally:
        # A busy mount (a process of the test still in it) is detached instead, so the
        # test's own failure is what it reports.
        if subprocess.run(["umount", str(path)], timeout=30).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], timeout=30)


def remount_read_only(path: Path) -> None:
    """The filesystem at ``path`` (a mount of ours) becomes read-only from now on."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], timeout=30, check=True)
