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
    storage_options,
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


def _is_file(url: str, options: Any) -> bool:
    """URL names one file (a Keras file ChiefModelCheckpoint wrote, with its sidecar)."""
    from forge_dist.storage.files import SIDECAR
    from forge_dist.storage.logdir import open_url

    try:
        fs, path = open_url(url, options, "URL")
        if fs.exists(path + SIDECAR):
            return True
        return path.lower().endswith((".keras", ".h5")) and bool(fs.isfile(path))
    except Exception:  # not a readable file: the root-or-folder path reports what is wrong
        return False


def cmd_verify(args: argparse.Namespace) -> int:
    if args.step is not None and args.all:
        raise UsageError("--step and --all cannot be used together")
    options = storage_options(args.storage_options)
    if _is_file(args.url, options):
        return _verify_file(args, options)
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
    orphans = [s for s in staging if s.kind == "orphan"]
    ok = all(r.ok for r in reports) and not orphans
    code = EXIT_OK if ok else EXIT_INTEGRITY
    return _emit(args, Outcome(store, reports, staging, code, None))


def _verify_file(args: argparse.Namespace, options: Any) -> int:
    """One file against its sidecar (``forge_dist.storage.files``)."""
    from forge_dist._urls import redact_url
    from forge_dist.storage.files import check_file

    if args.step is not None or args.all:
        raise UsageError("--step/--all need a checkpoint root, not one file")
    found = check_file(args.url, options, full=not args.fast)
    report = found.report
    if not found.committed:
        code, message = EXIT_NO_CHECKPOINT, f"{report.name}: {report.problems[0].message}"
    else:
        code, message = (EXIT_OK if report.ok else EXIT_INTEGRITY), None
    where = _FileWhere(redact_url(args.url))
    if found.note:
        if args.json:
            report.problems.append(_note(report.name, found.note))
        else:
            stdout_console().print(f"[dim]note {report.name}: {found.note}[/]")
    return _emit(args, Outcome(where, [report] if found.committed else [], [], code, message))


@dataclass
class _FileWhere:
    display: str


def _note(name: str, text: str) -> Any:
    from forge_dist.storage.types import Problem

    return Problem("previous_save", name, text, fatal=False)


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
        if s.kind == "orphan":
            con.print(
                f"[red]error[/] {s.name}: a step folder without its manifest (removed or "
                "lost: its files cannot be checked; readers ignore it)",
                markup=True,
            )
        else:
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
        place = (
            store.display if store.display.endswith("/" + names) else f"{names} in {store.display}"
        )
        con.print(f"[green]OK[/] {place}: {n_files} files, {human_bytes(n_bytes)} {mode}")
        return
    bad = [r.name for r in reports if not r.ok] + [
        s.name for s in out.staging if s.kind == "orphan"
    ]
    n_problems = sum(1 for r in reports for p in r.problems if p.fatal)
    n_problems += sum(1 for s in out.staging if s.kind == "orphan")
    place = ", ".join(bad)
    place = store.display if store.display.endswith("/" + place) else f"{place} in {store.display}"
    con.print(f"[red]FAILED[/] {place}: {n_problems} problem{'s' if n_problems != 1 else ''}")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    v = sub.add_parser("verify", parents=[common], help="check checkpoints against manifests")
    v.add_argument("url", help="a checkpoint root, one checkpoint folder, or one Keras file")
    v.add_argument("--step", type=int, help="verify this step (default: the newest)")
    v.add_argument("--all", action="store_true", help="verify every committed step")
    v.add_argument("--fast", action="store_true", help="presence and sizes only, no hashing")
    v.add_argument("--strict", action="store_true", help="unlisted files are failures")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_verify)
