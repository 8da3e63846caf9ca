"""``forge-dist verify URL [--step N | --all] [--fast] [--strict] [--json]``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from forge_dist.cli.common import (
    EXIT_INTEGRITY,
    EXIT_NO_CHECKPOINT,
    EXIT_OK,
    UsageError,
    resolve,
)
from forge_dist.cli.output import (
    human_bytes,
    print_json,
    progress_bar,
    staging_json,
    stdout_console,
)


def _targets(args: argparse.Namespace, store: Any, name: str | None) -> tuple[list[str], list]:
    """The folders to verify, and the root's staging (reported, never verified)."""
    from forge_dist.storage.manifest import step_dirname

    if name is not None:
        if args.step is not None or args.all:
            raise UsageError("--step/--all need a checkpoint root, not one checkpoint folder")
        return [name], []
    committed = store.list()  # also checks that the root is readable
    staging = store.list_staging()
    if args.step is not None:
        wanted = step_dirname(args.step)
        return [c.name for c in committed if c.name == wanted], staging
    if args.all:
        return [c.name for c in committed], staging
    return ([committed[-1].name] if committed else []), staging


def cmd_verify(args: argparse.Namespace) -> int:
    if args.step is not None and args.all:
        raise UsageError("--step and --all cannot be used together")
    store, name = resolve(args.url, args.storage_options)
    full = not args.fast
    targets, staging = _targets(args, store, name)
    if not targets:
        what = f"step {args.step}" if args.step is not None else "committed checkpoint"
        message = f"no {what} in {store.display}"
        return _emit(args, Outcome(store, [], staging, EXIT_NO_CHECKPOINT, message))
    show_bar = full and sys.stderr.isatty() and not args.json
    total = 0
    if show_bar:
        infos = [store.info(t) for t in targets]
        total = sum(i.manifest.total_bytes for i in infos if i is not None and i.manifest)
    advance, bar = progress_bar(show_bar, total)
    try:
        reports = [
            store.verify(t, full=full, strict=args.strict, progress=advance) for t in targets
        ]
    finally:
        if bar is not None:
            bar.stop()
    if all(any(p.kind == "uncommitted" for p in r.problems) for r in reports):
        message = f"{targets[0]} in {store.display} is not committed (no manifest)"
        return _emit(args, Outcome(store, reports, staging, EXIT_NO_CHECKPOINT, message))
    code = EXIT_OK if all(r.ok for r in reports) else EXIT_INTEGRITY
    return _emit(args, Outcome(store, reports, staging, code, None))


@dataclass
class Outcome:
    """What ``verify`` found, for either output."""

    store: Any
    reports: list[Any]
    staging: list[Any]
    code: int
    message: str | None


def _emit(args: argparse.Namespace, out: Outcome) -> int:
    if not args.json:
        _print_human(args, out)
        return out.code
    print_json(
        "verify",
        out.store.display,
        out.code,
        ok=out.code == EXIT_OK,
        mode="fast" if args.fast else "full",
        strict=bool(args.strict),
        checkpoints=[r.to_json() for r in out.reports],
        staging=[staging_json(s) for s in out.staging],
        error=out.message,
    )
    return out.code


def _print_human(args: argparse.Namespace, out: Outcome) -> None:
    store, reports, code, message = out.store, out.reports, out.code, out.message
    con = stdout_console()
    for r in reports:
        for p in r.problems:
            where = f"{r.name}/{p.path}" if p.path else r.name
            tag = "[red]error[/]" if p.fatal else "[yellow]warning[/]"
            con.print(f"{tag} {where}: {p.message}", markup=True)
            if p.kind == "hash_mismatch":
                con.print(f"      expected sha256 {p.expected}\n      actual   sha256 {p.actual}")
    for s in out.staging:
        con.print(f"[dim]note {s.name}: uncommitted staging (ignored by readers)[/]")
    if message:
        con.print(f"[yellow]NO CHECKPOINT[/] {message}")
        return
    if code == EXIT_OK:
        n_files = sum(r.files_checked for r in reports)
        n_bytes = sum(r.bytes_checked for r in reports)
        mode = "sizes checked" if args.fast else "sha256 checked"
        names = (
            ", ".join(r.name for r in reports)
            if len(reports) <= 3
            else f"{len(reports)} checkpoints"
        )
        con.print(
            f"[green]OK[/] {names} in {store.display}: {n_files} files, "
            f"{human_bytes(n_bytes)} {mode}"
        )
        return
    bad = [r.name for r in reports if not r.ok]
    n_problems = sum(1 for r in reports for p in r.problems if p.fatal)
    con.print(
        f"[red]FAILED[/] {', '.join(bad)} in {store.display}: "
        f"{n_problems} problem{'s' if n_problems != 1 else ''}"
    )
