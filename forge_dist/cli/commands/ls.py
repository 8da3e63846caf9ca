"""``forge-dist ls URL [--json]``."""

from __future__ import annotations

import argparse
from typing import Any

from forge_dist.cli.commands.inspect import position, run_label
from forge_dist.cli.common import EXIT_NO_CHECKPOINT, EXIT_OK, resolve
from forge_dist.cli.output import (
    fmt_metric,
    human_bytes,
    print_json,
    staging_json,
    stdout_console,
)

COLUMNS = (
    ("step", "right"),
    ("epoch", "left"),
    ("created (UTC)", "left"),
    ("run", "left"),
    ("size", "right"),
    ("metrics", "left"),
    ("status", "left"),
)


def best_step(infos: list[Any], monitor: str | None, mode: str) -> int | None:
    """The step with the best ``monitor`` (``--monitor``), as retention ranks them."""
    if monitor is None:
        return None
    from forge_dist.cli.commands.gc import resolve_monitor_mode
    from forge_dist.policy import rank_best

    mode = resolve_monitor_mode(infos, monitor, mode)
    ranked = rank_best({c.step: c.metrics.get(monitor) for c in infos if c.readable}, mode)
    return ranked[0] if ranked else None


def cmd_ls(args: argparse.Namespace) -> int:
    store, name = resolve(args.url, args.storage_options)
    if name is not None:  # one checkpoint folder
        one = store.info(name)
        infos, staging = ([one] if one is not None else []), []
    else:
        infos = store.list()
        staging = store.list_staging()
    code = EXIT_OK if infos else EXIT_NO_CHECKPOINT
    best = best_step(infos, args.monitor, args.mode) if infos else None
    if args.json:
        print_json(
            "ls",
            store.display,
            code,
            checkpoints=[checkpoint_json(c, best) for c in infos],
            staging=[staging_json(s) for s in staging],
            best_step=best,
        )
        return code
    con = stdout_console()
    if infos:
        con.print(_table(store.display, infos, best))
    else:
        con.print(f"no committed checkpoint in {store.display}")
    for s in staging:
        age = "?" if s.age_s is None else f"{s.age_s:.0f} s"
        owner = ", writer gone" if s.owner_dead else ""
        con.print(f"[dim]{s.name}: {s.kind} staging, last change {age} ago{owner}[/]")
    return code


def checkpoint_json(c: Any, best: int | None = None) -> dict[str, Any]:
    """One listed step, as ``ls --json`` shows it."""
    from forge_dist.storage.manifest import metric_to_json

    m = c.manifest
    return {
        "name": c.name,
        "step": c.step,
        "ok": m is not None,
        "error": c.error,
        "created": m.created if m else None,
        "epoch": m.state.get("epoch") if m else None,
        "epoch_done": m.state.get("epoch_done") if m else None,
        "run": dict(m.run) if m else {},
        "best": c.step == best,
        "files": len(m.files) if m else None,
        "bytes": m.total_bytes if m else None,
        "metrics": {k: metric_to_json(v) for k, v in sorted(m.metrics.items())} if m else {},
        "writer": dict(m.writer) if m else {},
    }


def _table(title: str, infos: list[Any], best: int | None) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in COLUMNS:  # metrics wrap, never cut
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for c in infos:
        m = c.manifest
        if m is None:
            table.add_row(str(c.step), "", "", "", "", "", f"[red]corrupt: {c.error}[/]")
            continue
        metrics = ", ".join(f"{k}={fmt_metric(v)}" for k, v in sorted(m.metrics.items()))
        status = "committed" + (", [bold]best[/]" if c.step == best else "")
        table.add_row(
            str(c.step),
            position(dict(m.state)),
            m.created[:19].replace("T", " "),
            run_label(dict(m.run)),
            human_bytes(m.total_bytes),
            metrics,
            status,
        )
    return table
