"""``forge-dist verify | ls | put | gc`` (see DESIGN.md, "The CLI contract").

Exit codes: 0 intact, 1 integrity failure, 2 usage/I-O/credential error,
3 no committed checkpoint at URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from forge_dist import __version__
from forge_dist._urls import redact_text, redact_url, url_secrets
from forge_dist.errors import ConfigurationError, ForgeDistError, NoCheckpointError
from forge_dist.storage.manifest import metric_to_json

EXIT_OK, EXIT_INTEGRITY, EXIT_ERROR, EXIT_NO_CHECKPOINT = 0, 1, 2, 3


class UsageError(ConfigurationError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every other error
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


# --------------------------------------------------------------------------- helpers
def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _human_bytes(n: int | float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _fmt_metric(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def _storage_options(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--storage-options is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError("--storage-options must be a JSON object")
    return value


def _split_url(url: str) -> tuple[str, str] | None:
    """``(parent, basename)`` of a URL or path, or None if it has no parent."""
    stripped = url.rstrip("/")
    scheme, sep, rest = stripped.partition("://")
    if not sep:
        scheme, rest = "", stripped
    if "/" not in rest.strip("/"):
        return None
    parent, base = rest.rsplit("/", 1)
    if not parent and not sep:
        parent = "/"
    return (f"{scheme}://{parent}" if sep else parent), base


def _resolve(url: str, options: dict[str, Any] | None) -> tuple[Any, str | None]:
    """``(store, checkpoint name or None)``: URL is a root or one checkpoint folder."""
    from forge_dist.storage import CheckpointStore
    from forge_dist.storage.manifest import STAGING_RE, STEP_RE

    split = _split_url(url)
    if split is not None:
        parent, base = split
        if STEP_RE.match(base) or STAGING_RE.match(base):
            return CheckpointStore(parent, options), base
        parent_store = CheckpointStore(parent, options)
        try:
            if parent_store._backend.read_manifest(base) is not None:
                return parent_store, base
        except ForgeDistError:
            pass
    return CheckpointStore(url, options), None


def _progress(enabled: bool, total: int) -> tuple[Callable[[int], None] | None, Any]:
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
        console=_stderr_console(),
        transient=True,
    )
    task = bar.add_task("hashing", total=total)
    bar.start()
    return (lambda n: bar.advance(task, n)), bar


# --------------------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    from forge_dist.storage.manifest import parse_step_dirname, step_dirname

    if args.step is not None and args.all:
        raise UsageError("--step and --all cannot be used together")
    store, name = _resolve(args.url, _storage_options(args.storage_options))
    full = not args.fast
    staging = []
    if name is not None:
        if args.step is not None or args.all:
            raise UsageError("--step/--all need a checkpoint root, not one checkpoint folder")
        targets = [name]
    else:
        committed = store.list()  # also checks that the root is readable
        staging = store.list_staging()
        if args.step is not None:
            wanted = step_dirname(args.step)
            targets = [c.name for c in committed if c.name == wanted]
        elif args.all:
            targets = [c.name for c in committed]
        else:
            targets = [committed[-1].name] if committed else []
    if not targets:
        what = f"step {args.step}" if args.step is not None else "committed checkpoint"
        return _emit_verify(
            args, store, [], staging, EXIT_NO_CHECKPOINT, f"no {what} in {store.display}"
        )

    show_bar = full and sys.stderr.isatty() and not args.json
    total = 0
    if show_bar:
        for t in targets:
            info = store._load(parse_step_dirname(t) or 0, t)
            if info is not None and info.manifest is not None:
                total += info.manifest.total_bytes
    advance, bar = _progress(show_bar, total)
    reports = []
    try:
        for t in targets:
            reports.append(store.verify(t, full=full, strict=args.strict, progress=advance))
    finally:
        if bar is not None:
            bar.stop()
    uncommitted = [r for r in reports if any(p.kind == "uncommitted" for p in r.problems)]
    if uncommitted and len(uncommitted) == len(reports):
        return _emit_verify(
            args,
            store,
            reports,
            staging,
            EXIT_NO_CHECKPOINT,
            f"{targets[0]} in {store.display} is not committed (no manifest)",
        )
    code = EXIT_OK if all(r.ok for r in reports) else EXIT_INTEGRITY
    return _emit_verify(args, store, reports, staging, code, None)


def _emit_verify(
    args: argparse.Namespace,
    store: Any,
    reports: list[Any],
    staging: list[Any],
    code: int,
    message: str | None,
) -> int:
    if args.json:
        out = {
            "command": "verify",
            "url": store.display,
            "ok": code == EXIT_OK,
            "exit_code": code,
            "mode": "fast" if args.fast else "full",
            "strict": bool(args.strict),
            "checkpoints": [r.to_json() for r in reports],
            "staging": [_staging_json(s) for s in staging],
            "error": message,
        }
        print(json.dumps(out, indent=2, sort_keys=True))
        return code
    con = _stdout_console()
    for r in reports:
        for p in r.problems:
            where = f"{r.name}/{p.path}" if p.path else r.name
            tag = "[red]error[/]" if p.fatal else "[yellow]warning[/]"
            con.print(f"{tag} {where}: {p.message}", markup=True)
            if p.kind == "hash_mismatch":
                con.print(f"      expected sha256 {p.expected}\n      actual   sha256 {p.actual}")
    for s in staging:
        con.print(f"[dim]note {s.name}: uncommitted staging (ignored by readers)[/]")
    if message:
        con.print(f"[yellow]NO CHECKPOINT[/] {message}")
        return code
    n_files = sum(r.files_checked for r in reports)
    n_bytes = sum(r.bytes_checked for r in reports)
    mode = "sizes checked" if args.fast else "sha256 checked"
    if code == EXIT_OK:
        names = (
            ", ".join(r.name for r in reports)
            if len(reports) <= 3
            else f"{len(reports)} checkpoints"
        )
        con.print(
            f"[green]OK[/] {names} in {store.display}: {n_files} files, "
            f"{_human_bytes(n_bytes)} {mode}"
        )
    else:
        bad = [r.name for r in reports if not r.ok]
        n_problems = sum(1 for r in reports for p in r.problems if p.fatal)
        con.print(
            f"[red]FAILED[/] {', '.join(bad)} in {store.display}: "
            f"{n_problems} problem{'s' if n_problems != 1 else ''}"
        )
    return code


def _staging_json(s: Any) -> dict[str, Any]:
    return {
        "name": s.name,
        "step": s.step,
        "kind": s.kind,
        "age_s": None if s.age_s is None else round(s.age_s, 3),
        "owner_dead": s.owner_dead,
    }


# --------------------------------------------------------------------------- ls
def cmd_ls(args: argparse.Namespace) -> int:
    from forge_dist.storage import CheckpointStore

    store = CheckpointStore(args.url, _storage_options(args.storage_options))
    infos = store.list()
    staging = store.list_staging()
    code = EXIT_OK if infos else EXIT_NO_CHECKPOINT
    if args.json:
        rows = []
        for c in infos:
            m = c.manifest
            rows.append(
                {
                    "name": c.name,
                    "step": c.step,
                    "ok": m is not None,
                    "error": c.error,
                    "created": m.created if m else None,
                    "files": len(m.files) if m else None,
                    "bytes": m.total_bytes if m else None,
                    "metrics": {k: metric_to_json(v) for k, v in sorted(m.metrics.items())}
                    if m
                    else {},
                    "writer": dict(m.writer) if m else {},
                }
            )
        print(
            json.dumps(
                {
                    "command": "ls",
                    "url": store.display,
                    "exit_code": code,
                    "checkpoints": rows,
                    "staging": [_staging_json(s) for s in staging],
                },
                indent=2,
                sort_keys=True,
            )
        )
        return code
    from rich.table import Table

    con = _stdout_console()
    if not infos:
        con.print(f"no committed checkpoint in {store.display}")
    else:
        table = Table(title=store.display, title_justify="left")
        for col, justify in (
            ("step", "right"),
            ("created (UTC)", "left"),
            ("files", "right"),
            ("size", "right"),
            ("metrics", "left"),
            ("status", "left"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for c in infos:
            m = c.manifest
            if m is None:
                table.add_row(str(c.step), "", "", "", "", f"[red]corrupt: {c.error}[/]")
                continue
            metrics = ", ".join(f"{k}={_fmt_metric(v)}" for k, v in sorted(m.metrics.items()))
            table.add_row(
                str(c.step),
                m.created[:19].replace("T", " "),
                str(len(m.files)),
                _human_bytes(m.total_bytes),
                metrics,
                "committed",
            )
        con.print(table)
    for s in staging:
        age = "?" if s.age_s is None else f"{s.age_s:.0f} s"
        owner = ", writer gone" if s.owner_dead else ""
        con.print(f"[dim]{s.name}: {s.kind} staging, last change {age} ago{owner}[/]")
    return code


# --------------------------------------------------------------------------- put
def _parse_meta(items: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    metrics: dict[str, float] = {}
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta expects KEY=VALUE, got {item!r}")
        try:
            metrics[key] = float(value)
        except ValueError:
            meta[key] = value
    return metrics, meta


def cmd_put(args: argparse.Namespace) -> int:
    from forge_dist.storage import CheckpointStore

    if args.step < 0:
        raise UsageError("--step must be >= 0")
    metrics, meta = _parse_meta(args.meta or [])
    store = CheckpointStore(args.url, _storage_options(args.storage_options))
    t0 = time.perf_counter()
    info = store.put(
        args.src,
        args.step,
        metrics=metrics,
        state={"meta": meta} if meta else None,
        replace=args.replace,
    )
    dt = time.perf_counter() - t0
    m = info.manifest
    if args.json:
        print(
            json.dumps(
                {
                    "command": "put",
                    "url": store.display,
                    "exit_code": 0,
                    "name": info.name,
                    "step": info.step,
                    "files": len(m.files),
                    "bytes": m.total_bytes,
                    "seconds": round(dt, 3),
                },
                indent=2,
                sort_keys=True,
            )
        )
    else:
        _stdout_console().print(
            f"[green]committed[/] {info.name} to {store.display}: {len(m.files)} files, "
            f"{_human_bytes(m.total_bytes)} in {dt:.2f} s"
        )
    return EXIT_OK


# --------------------------------------------------------------------------- gc
def cmd_gc(args: argparse.Namespace) -> int:
    from forge_dist.storage import CheckpointStore

    if (args.keep_best is not None) != (args.monitor is not None):
        raise UsageError("--keep-best and --monitor go together")
    store = CheckpointStore(args.url, _storage_options(args.storage_options))
    report = store.gc(
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        monitor=args.monitor,
        mode=args.mode,
        grace_s=args.grace,
        dry_run=args.dry_run,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "command": "gc",
                    "url": store.display,
                    "exit_code": 0,
                    "dry_run": report.dry_run,
                    "deleted_steps": report.deleted_steps,
                    "kept_steps": report.kept_steps,
                    "removed_staging": report.removed_staging,
                    "kept_staging": report.kept_staging,
                },
                indent=2,
                sort_keys=True,
            )
        )
        return EXIT_OK
    con = _stdout_console()
    verb = "would delete" if args.dry_run else "deleted"
    for step in report.deleted_steps:
        con.print(f"{verb} step {step}")
    for name in report.removed_staging:
        con.print(f"{'would remove' if args.dry_run else 'removed'} stale staging {name}")
    for name in report.kept_staging:
        con.print(f"[dim]kept {name} (a writer may still be using it; --grace to change)[/]")
    con.print(f"kept {len(report.kept_steps)} committed step(s) in {store.display}")
    return EXIT_OK


# --------------------------------------------------------------------------- demo
def _find_mpirun() -> str | None:
    import os
    import shutil

    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return local if os.path.exists(local) else shutil.which("mpirun")


def _clear_demo_root(path: str) -> None:
    """Remove an earlier demo's root, but only if it holds nothing but forge_dist files."""
    import os
    import re
    import shutil

    if not os.path.isdir(path):
        return
    ours = re.compile(r"^(step-\d{8,}(\.(tmp|del)-.+)?|history\.csv(\.tmp-\d+)?)$")
    foreign = [n for n in os.listdir(path) if not ours.match(n)]
    if foreign:
        raise UsageError(
            f"--fresh refuses to clear {path}: it holds files the demo did not write "
            f"({', '.join(sorted(foreign)[:3])})"
        )
    shutil.rmtree(path)


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util
    import os
    import subprocess
    import tempfile

    from forge_dist.storage import CheckpointStore

    url = args.url
    local = "://" not in url or url.startswith("file://")
    if args.fresh:
        if not local:
            raise UsageError("--fresh only clears a local demo folder")
        _clear_demo_root(url.removeprefix("file://"))
    mpirun = _find_mpirun()
    use_mpi = (
        not args.strategy and mpirun is not None and importlib.util.find_spec("mpi4py") is not None
    )
    con = _stdout_console()
    fd, summary_path = tempfile.mkstemp(prefix="forge-dist-demo-", suffix=".json")
    os.close(fd)
    child = [
        sys.executable,
        "-m",
        "forge_dist.demo",
        "--url",
        url,
        "--summary",
        summary_path,
        "--epochs",
        str(args.epochs),
    ]
    if args.storage_options:
        child += ["--storage-options", args.storage_options]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if use_mpi:
        cmd = [mpirun, "-np", "2", "--oversubscribe", *child]
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        con.print("[bold]forge_dist demo[/]: 2 processes under mpirun (mpi backend)")
    else:
        cmd = [*child, "--strategy"]
        why = "asked for" if args.strategy else "no mpirun/mpi4py here"
        con.print(f"[bold]forge_dist demo[/]: MirroredStrategy over 2 logical CPUs ({why})")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as errlog:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=errlog, env=env, text=True, start_new_session=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            con.print(f"  {line.rstrip()}", highlight=False, markup=False)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise UsageError(f"the demo did not finish within {args.timeout}s") from None
        if code != 0:
            errlog.seek(0)
            tail = errlog.read().decode(errors="replace").strip().splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            raise UsageError(f"the demo's training exited with code {code}")
    with open(summary_path) as f:
        summary = json.load(f)
    os.unlink(summary_path)
    store = CheckpointStore(url, _storage_options(args.storage_options))
    reports = [store.verify(c.name) for c in store.list()]
    bad = [r for r in reports if not r.ok]
    for r in reports:
        tag = "[green]OK[/]" if r.ok else "[red]FAILED[/]"
        con.print(
            f"  verify {r.name}: {tag} ({r.files_checked} files, "
            f"{_human_bytes(r.bytes_checked)} sha256 checked)"
        )
    stop = (
        f"stopped early after epoch {summary['epochs_run']}"
        if summary["stopped_early"]
        else f"ran all {summary['epochs_run']} epochs"
    )
    parts = [
        f"{summary['ranks']} rank(s), {summary['replicas']} replica(s)",
        stop,
        f"best epoch {summary['best_epoch']} (val_loss {summary['best_val_loss']:.4f})"
        + (", its weights restored on every rank" if summary.get("restored_best") else ""),
        f"final lr {summary['final_lr']:.4g}",
        f"{summary['checkpoints_committed']} checkpoint(s) committed, {len(reports)} kept, "
        + ("all verified" if not bad else f"{len(bad)} CORRUPT"),
    ]
    if summary["ranks"] > 1:
        parts.append(f"weights identical across ranks at {summary['guard_checks']} check(s)")
    parts.append(f"{time.perf_counter() - t0:.0f}s")
    con.print("[bold]summary[/]: " + "; ".join(parts))
    con.print(f"  inspect: forge-dist ls {store.display}")
    return EXIT_OK if not bad else EXIT_INTEGRITY


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage-options",
        metavar="JSON",
        help="fsspec storage options as a JSON object (credentials come from "
        "the environment otherwise)",
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    p = _Parser(
        prog="forge-dist", description="Atomic, verifiable checkpoints for distributed Keras jobs."
    )
    p.add_argument("--version", action="version", version=f"forge-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    v = sub.add_parser("verify", parents=[common], help="check checkpoints against manifests")
    v.add_argument("url", help="a checkpoint root, or one checkpoint folder")
    v.add_argument("--step", type=int, help="verify this step (default: the newest)")
    v.add_argument("--all", action="store_true", help="verify every committed step")
    v.add_argument("--fast", action="store_true", help="presence and sizes only, no hashing")
    v.add_argument("--strict", action="store_true", help="unlisted files are failures")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_verify)

    ls = sub.add_parser("ls", parents=[common], help="list committed checkpoints")
    ls.add_argument("url")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    put = sub.add_parser("put", parents=[common], help="commit a local file or folder as a step")
    put.add_argument("src")
    put.add_argument("url")
    put.add_argument("--step", type=int, required=True)
    put.add_argument(
        "--meta",
        action="append",
        metavar="KEY=VALUE",
        help="numbers go to the manifest's metrics, text to state.meta",
    )
    put.add_argument("--replace", action="store_true", help="overwrite a committed step")
    put.add_argument("--json", action="store_true")
    put.set_defaults(func=cmd_put)

    gc = sub.add_parser("gc", parents=[common], help="apply retention, remove dead staging")
    gc.add_argument("url")
    gc.add_argument("--keep-last", type=int, required=True, metavar="N")
    gc.add_argument("--keep-best", type=int, metavar="K")
    gc.add_argument("--monitor", metavar="M")
    gc.add_argument("--mode", choices=("min", "max"), default="min")
    gc.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="staging unchanged this long counts as abandoned (default 3600)",
    )
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(func=cmd_gc)
    demo = sub.add_parser(
        "demo", parents=[common], help="a real 2-process data-parallel Keras training, then verify"
    )
    demo.add_argument("--url", default="./forge-runs/demo", help="checkpoint root (any URL)")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument(
        "--fresh",
        action="store_true",
        help="clear an earlier demo's local folder first (otherwise it resumes)",
    )
    demo.add_argument(
        "--strategy",
        action="store_true",
        help="use MirroredStrategy in one process instead of mpirun",
    )
    demo.add_argument("--timeout", type=float, default=600.0, help="wall-clock bound (s)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("forge-dist: interrupted", file=sys.stderr)
        return 130
    except (ForgeDistError, OSError) as e:
        if args.debug:
            raise
        code = EXIT_NO_CHECKPOINT if isinstance(e, NoCheckpointError) else EXIT_ERROR
        secrets = url_secrets(getattr(args, "url", "") or "")
        line = redact_text(" ".join(str(e).split()), secrets) or type(e).__name__
        if getattr(args, "json", False):
            print(
                json.dumps(
                    {
                        "command": args.command,
                        "url": redact_url(getattr(args, "url", "")),
                        "ok": False,
                        "exit_code": code,
                        "error": line,
                    },
                    indent=2,
                    sort_keys=True,
                )
            )
        print(f"forge-dist: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
