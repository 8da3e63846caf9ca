"""``forge-dist ls URL [--json]``."""

from __future__ import annotations

import argparse
import sys
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


#: Metrics a line shows (the rest are counted; ``--json`` and ``inspect`` have all).
SHOWN_METRICS = 3


def _sizes(store: Any, infos: list[Any]) -> dict[int, str | None]:
    """Each readable step's first size problem (a file missing, truncated or emptied),
    or None: a check of sizes only; contents are hashed by ``verify``."""
    out: dict[int, str | None] = {}
    for c in infos:
        if c.manifest is None:
            continue
        report = store.verify(c.name, full=False)
        bad = [p for p in report.problems if p.fatal]
        out[c.step] = f"{bad[0].path}: {bad[0].message}" if bad else None
    return out


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
    sizes = _sizes(store, infos)
    if args.json:
        print_json(
            "ls",
            store.display,
            code,
            checkpoints=[checkpoint_json(c, best, sizes.get(c.step)) for c in infos],
            staging=[staging_json(s) for s in staging],
            best_step=best,
        )
        return code
    con = stdout_console()
    if not infos:
        con.print(f"no committed checkpoint in {store.display}")
    elif sys.stdout.isatty():
        con.print(_table(store.display, infos, best, sizes, args.monitor))
    else:  # a pipe: one plain line per step, whatever the width
        for c in infos:
            print("  ".join(_row(c, best, sizes, args.monitor, markup=False)))
    if infos:
        con.print(
            "[dim]sizes checked; contents are hashed by forge-dist verify --all[/]",
            highlight=False,
        )
    for s in staging:
        age = "?" if s.age_s is None else f"{s.age_s:.0f} s"
        owner = ", writer gone" if s.owner_dead else ""
        if s.kind == "orphan":
            con.print(f"[red]{s.name}: a step folder without its manifest (damaged)[/]")
            continue
        con.print(f"[dim]{s.name}: {s.kind} staging, last change {age} ago{owner}[/]")
    return code


def checkpoint_json(c: Any, best: int | None = None, damage: str | None = None) -> dict[str, Any]:
    """One listed step, as ``ls --json`` shows it (``epoch`` counted from 1, as Keras
    and the table count it)."""
    from forge_dist.storage.manifest import metric_to_json

    m = c.manifest
    epoch = m.state.get("epoch") if m else None
    return {
        "name": c.name,
        "step": c.step,
        "ok": m is not None and damage is None,
        "error": c.error or damage,
        "created": m.created if m else None,
        "epoch": epoch + 1 if isinstance(epoch, int) else None,
        "epoch_done": m.state.get("epoch_done") if m else None,
        "run": dict(m.run) if m else {},
        "best": c.step == best,
        "files": len(m.files) if m else None,
        "bytes": m.total_bytes if m else None,
        "metrics": {k: metric_to_json(v) for k, v in sorted(m.metrics.items())} if m else {},
        "writer": dict(m.writer) if m else {},
    }


def _metrics(metrics: dict[str, float], monitor: str | None) -> str:
    """Up to :data:`SHOWN_METRICS`: the monitor first, then validation values, then the
    rest; how many more there are."""
    order = sorted(metrics, key=lambda k: (k != monitor, not k.startswith("val_"), k))
    shown = ", ".join(f"{k}={fmt_metric(metrics[k])}" for k in order[:SHOWN_METRICS])
    more = len(order) - SHOWN_METRICS
    return shown + (f" (+{more})" if more > 0 else "")


def _row(
    c: Any, best: int | None, sizes: dict[int, str | None], monitor: str | None, markup: bool
) -> list[str]:
    m = c.manifest
    if m is None:
        status = f"corrupt: {c.error}"
        return [str(c.step), "", "", "", "", "", f"[red]{status}[/]" if markup else status]
    damage = sizes.get(c.step)
    if damage is not None:
        status = f"damaged: {damage}"
        status = f"[red]{status}[/]" if markup else status
    else:
        status = "committed" + (", best" if c.step == best else "")
        if markup and c.step == best:
            status = "committed, [bold]best[/]"
    return [
        str(c.step),
        position(dict(m.state)),
        m.created[:19].replace("T", " "),
        run_label(dict(m.run)),
        human_bytes(m.total_bytes),
        _metrics(dict(m.metrics), monitor),
        status,
    ]


def _table(
    title: str, infos: list[Any], best: int | None, sizes: dict[int, str | None], monitor: Any
) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in COLUMNS:
        table.add_column(col, justify=justify, no_wrap=col != "status")  # type: ignore[arg-type]
    for c in infos:
        table.add_row(*_row(c, best, sizes, monitor, markup=True))
    return table


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    ls = sub.add_parser("ls", parents=[common], help="list committed checkpoints")
    ls.add_argument("url", help="a checkpoint root, or one checkpoint folder")
    ls.add_argument("--monitor", metavar="M", help="mark the best step by this metric")
    ls.add_argument("--mode", choices=("auto", "min", "max"), default="auto")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
