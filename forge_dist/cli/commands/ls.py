"""``forge-dist ls URL [--json]``."""

from __future__ import annotations

import argparse
from typing import Any

from forge_dist.cli.common import EXIT_NO_CHECKPOINT, EXIT_OK, open_store
from forge_dist.cli.output import (
    fmt_metric,
    human_bytes,
    print_json,
    staging_json,
    stdout_console,
)

COLUMNS = (
    ("step", "right"),
    ("created (UTC)", "left"),
    ("files", "right"),
    ("size", "right"),
    ("metrics", "left"),
    ("status", "left"),
)


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(args.url, args.storage_options)
    infos = store.list()
    staging = store.list_staging()
    code = EXIT_OK if infos else EXIT_NO_CHECKPOINT
    if args.json:
        print_json(
            "ls",
            store.display,
            code,
            checkpoints=[checkpoint_json(c) for c in infos],
            staging=[staging_json(s) for s in staging],
        )
        return code
    con = stdout_console()
    if infos:
        con.print(_table(store.display, infos))
    else:
        con.print(f"no committed checkpoint in {store.display}")
    for s in staging:
        age = "?" if s.age_s is None else f"{s.age_s:.0f} s"
        owner = ", writer gone" if s.owner_dead else ""
        con.print(f"[dim]{s.name}: {s.kind} staging, last change {age} ago{owner}[/]")
    return code


def checkpoint_json(c: Any) -> dict[str, Any]:
    """One listed step, as ``ls --json`` shows it."""
    from forge_dist.storage.manifest import metric_to_json

    m = c.manifest
    return {
        "name": c.name,
        "step": c.step,
        "ok": m is not None,
        "error": c.error,
        "created": m.created if m else None,
        "files": len(m.files) if m else None,
        "bytes": m.total_bytes if m else None,
        "metrics": {k: metric_to_json(v) for k, v in sorted(m.metrics.items())} if m else {},
        "writer": dict(m.writer) if m else {},
    }


def _table(title: str, infos: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in COLUMNS:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in infos:
        m = c.manifest
        if m is None:
            table.add_row(str(c.step), "", "", "", "", f"[red]corrupt: {c.error}[/]")
            continue
        metrics = ", ".join(f"{k}={fmt_metric(v)}" for k, v in sorted(m.metrics.items()))
        table.add_row(
            str(c.step),
            m.created[:19].replace("T", " "),
            str(len(m.files)),
            human_bytes(m.total_bytes),
            metrics,
            "committed",
        )
    return table
