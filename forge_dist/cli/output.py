"""How the CLI shows things: JSON documents, consoles, sizes, metrics, progress bars.

``rich`` is imported only when something is shown on a terminal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from forge_dist._units import human_bytes


def print_json(command: str, url: str, exit_code: int, **fields: Any) -> None:
    """One stable JSON document: ``command``, ``url`` and ``exit_code``, then ``fields``."""
    doc = {"command": command, "url": url, "exit_code": exit_code, **fields}
    print(json.dumps(doc, indent=2, sort_keys=True))


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def stdout_console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


__all__ = ["human_bytes"]  # (where the CLI has always found it)


def fmt_metric(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def staging_json(s: Any) -> dict[str, Any]:
    return {
        "name": s.name,
        "step": s.step,
        "kind": s.kind,
        "age_s": None if s.age_s is None else round(s.age_s, 3),
        "owner_dead": s.owner_dead,
    }


def progress_bar(enabled: bool, total: int) -> tuple[Callable[[int], None] | None, Any]:
    """``(advance, bar)`` for ``total`` bytes on stderr, or ``(None, None)``."""
    if not enabled or total <= 0:
        return None, None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
    )
    task = bar.add_task("hashing", total=total)
    bar.start()
    return (lambda n: bar.advance(task, n)), bar
