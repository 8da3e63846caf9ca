"""``forge-dist gc URL [--keep-last N] [--keep-best K --monitor M [--mode auto|min|max]]``."""

from __future__ import annotations

import argparse
from typing import Any

from forge_dist.cli.common import EXIT_OK, UsageError, open_store, positive
from forge_dist.cli.output import print_json, stderr_console, stdout_console


def resolve_monitor_mode(infos: list[Any], monitor: str, mode: str) -> str:
    """``--mode`` for ``monitor``: as given, else Keras' rules for the name, else the
    direction the run's own checkpoints recorded. A monitor that no manifest carries is
    a usage error listing the metrics found."""
    from forge_dist.errors import ConfigurationError
    from forge_dist.policy import resolve_mode

    found = sorted({k for c in infos for k in c.metrics})
    if monitor not in found:
        raise UsageError(
            f"no checkpoint records the metric {monitor!r}; found: {', '.join(found) or 'none'}"
        )
    if mode != "auto":
        return mode
    try:
        return resolve_mode(monitor, "auto")
    except ConfigurationError:
        pass
    recorded = {
        cb.get("mode")
        for c in infos
        for cb in (c.state.get("callbacks") or {}).values()
        if isinstance(cb, dict) and cb.get("mode") in ("min", "max")
    }
    if len(recorded) == 1:
        return recorded.pop()
    raise UsageError(
        f"cannot tell whether {monitor!r} should be minimised or maximised "
        f"(the checkpoints record {sorted(recorded) or 'no direction'}): pass --mode min or max"
    )


def _contradiction(monitor: str, mode: str) -> str | None:
    """A ``--mode`` against the direction the metric's name says (``val_loss`` and
    ``max``): the best would be the worst."""
    from forge_dist.errors import ConfigurationError
    from forge_dist.policy import resolve_mode

    try:
        natural = resolve_mode(monitor, "auto")
    except ConfigurationError:
        return None
    if natural == mode:
        return None
    way = "minimised" if natural == "min" else "maximised"
    return (
        f"warning: {monitor!r} is normally {way}; with --mode {mode} the steps kept as best are "
        "the worst ones (--mode auto follows the name)"
    )


def cmd_gc(args: argparse.Namespace) -> int:
    if (args.keep_best is not None) != (args.monitor is not None):
        raise UsageError("--keep-best and --monitor go together")
    if args.keep_last is None and args.keep_best is None:
        raise UsageError("say what to keep: --keep-last N and/or --keep-best K --monitor M")
    positive("--keep-last", args.keep_last)
    positive("--keep-best", args.keep_best)
    store = open_store(args.url, args.storage_options)
    mode = "min"  # not used without a monitor
    if args.monitor is not None:
        mode = resolve_monitor_mode(
            [c for c in store.list() if c.readable], args.monitor, args.mode
        )
        if args.mode != "auto" and (warning := _contradiction(args.monitor, args.mode)):
            stderr_console().print(warning, markup=False)
    from forge_dist.policy import Retention

    report = store.gc(
        Retention(args.keep_last, args.keep_best, args.monitor, mode),
        grace_s=args.grace,
        dry_run=args.dry_run,
        strict=True,  # an I/O error is an error here, not a staging "kept"
    )
    if args.json:
        print_json(
            "gc",
            store.display,
            EXIT_OK,
            dry_run=report.dry_run,
            deleted_steps=report.deleted_steps,
            kept_steps=report.kept_steps,
            removed_staging=report.removed_staging,
            kept_staging=report.kept_staging,
        )
        return EXIT_OK
    con = stdout_console()
    verb = "would delete" if args.dry_run else "deleted"
    for step in report.deleted_steps:
        con.print(f"{verb} step {step}")
    for name in report.removed_staging:
        con.print(f"{'would remove' if args.dry_run else 'removed'} stale staging {name}")
    for name in report.kept_staging:
        con.print(f"[dim]kept {name} (a writer may still be using it; --grace to change)[/]")
    kept = "would keep" if args.dry_run else "kept"
    con.print(f"{kept} {len(report.kept_steps)} committed step(s) in {store.display}")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    from forge_dist.storage.retention import DEFAULT_GRACE_S

    gc = sub.add_parser("gc", parents=[common], help="apply retention, remove dead staging")
    gc.add_argument("url")
    gc.add_argument("--keep-last", type=int, metavar="N", help="the N newest steps")
    gc.add_argument("--keep-best", type=int, metavar="K", help="the K best by --monitor")
    gc.add_argument("--monitor", metavar="M")
    gc.add_argument(
        "--mode",
        choices=("auto", "min", "max"),
        default="auto",
        help="auto: Keras' rule for the name, else the direction the checkpoints recorded",
    )
    gc.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        metavar="SECONDS",
        help=f"staging unchanged this long counts as abandoned (default {DEFAULT_GRACE_S:g})",
    )
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(func=cmd_gc)
