"""Named points on the save and delete paths, for crash tests.

Production code calls :func:`point` at each place where a crash must leave the
store consistent. Nothing happens unless a test installs :data:`hook`; the crash
tests install one that reports the point to a parent process, which then
SIGKILLs the writer at exactly that instant.
"""

from __future__ import annotations

from collections.abc import Callable

hook: Callable[[str], None] | None = None


def point(name: str) -> None:
    if hook is not None:
        hook(name)
