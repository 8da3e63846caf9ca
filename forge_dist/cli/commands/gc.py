"""``forge-dist gc URL --keep-last N [--keep-best K --monitor M --mode min|max]``."""

from __future__ import annotations

import argparse

from forge_dist.cli.common import EXIT_OK, UsageError, open_store
from forge_dist.cli.output import print_json, stdout_console


def cmd_gc(args: argparse.Namespace) -> int:
    if (args.keep_best is not None) != (args.monitor is not None):
        raise UsageError("--keep-best and --monitor go together")
    store = open_store(args.url, args.storage_options)
    report = store.gc(
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        monitor=args.monitor,
        mode=args.mode,
        grace_s=args.grace,
        dry_run=args.dry_run,
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
    con.print(f"kept {len(report.kept_steps)} committed step(s) in {store.display}")
    return EXIT_OK
