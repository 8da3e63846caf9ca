"""``forge-dist demo``: a real 2-process data-parallel Keras training (the training
itself is :mod:`forge_dist.demo`, run here in child processes), then ``verify``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from forge_dist.cli.common import EXIT_INTEGRITY, EXIT_OK, UsageError, open_store
from forge_dist.cli.output import human_bytes, stdout_console

#: What a demo root may hold: steps, their staging and deletes, the CSV and its temp,
#: the writer lease and its lock.
_OURS = re.compile(
    r"^(step-\d{8,}(\.(tmp|del)-.+)?|history\.csv(\.tmp-\d+)?|writer\.lease(\.tmp-.+)?"
    r"|\.writer\.lock)$"
)


def find_mpirun() -> str | None:
    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return local if os.path.exists(local) else shutil.which("mpirun")


def clear_demo_root(path: str) -> None:
    """Remove an earlier demo's root, but only if it holds nothing but forge_dist files."""
    if not os.path.isdir(path):
        return
    foreign = [n for n in os.listdir(path) if not _OURS.match(n)]
    if foreign:
        raise UsageError(
            f"--fresh refuses to clear {path}: it holds files the demo did not write "
            f"({', '.join(sorted(foreign)[:3])})"
        )
    shutil.rmtree(path)


def _command(args: argparse.Namespace, summary_path: str, con: Any) -> tuple[list, dict]:
    """The training's command line and environment: mpirun -np 2 when it is here,
    else MirroredStrategy over 2 logical CPUs in one process."""
    child = [sys.executable, "-m", "forge_dist.demo", "--url", args.url]
    child += ["--summary", summary_path, "--epochs", str(args.epochs)]
    if args.storage_options:
        child += ["--storage-options", args.storage_options]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    mpirun = find_mpirun()
    have_mpi = mpirun is not None and importlib.util.find_spec("mpi4py") is not None
    if not args.strategy and have_mpi:
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        con.print("[bold]forge_dist demo[/]: 2 processes under mpirun (mpi backend)")
        return [mpirun, "-np", "2", "--oversubscribe", *child], env
    why = "asked for" if args.strategy else "no mpirun/mpi4py here"
    con.print(f"[bold]forge_dist demo[/]: MirroredStrategy over 2 logical CPUs ({why})")
    return [*child, "--strategy"], env


def _train(cmd: list[str], env: dict[str, str], timeout: float, con: Any) -> None:
    """Run the training, echoing the chief's lines; its error tail on failure."""
    with tempfile.TemporaryFile() as errlog:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=errlog, env=env, text=True, start_new_session=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            con.print(f"  {line.rstrip()}", highlight=False, markup=False)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise UsageError(f"the demo did not finish within {timeout}s") from None
        if code != 0:
            errlog.seek(0)
            tail = errlog.read().decode(errors="replace").strip().splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            raise UsageError(f"the demo's training exited with code {code}")


def _summary_line(summary: dict[str, Any], kept: int, bad: int, seconds: float) -> str:
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
        f"{summary['checkpoints_committed']} checkpoint(s) committed, {kept} kept, "
        + ("all verified" if not bad else f"{bad} CORRUPT"),
    ]
    if summary["ranks"] > 1:
        checks, bad = summary["guard_checks"], summary["guard_mismatches"]
        parts.append(
            f"weights identical across ranks at {checks} check(s)"
            if not bad
            else f"weights DIFFERED across ranks at {bad} of {checks} check(s)"
        )
    parts.append(f"{seconds:.0f}s")
    return "; ".join(parts)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.fresh:
        if "://" in args.url and not args.url.startswith("file://"):
            raise UsageError("--fresh only clears a local demo folder")
        clear_demo_root(args.url.removeprefix("file://"))
    con = stdout_console()
    fd, summary_path = tempfile.mkstemp(prefix="forge-dist-demo-", suffix=".json")
    os.close(fd)
    t0 = time.perf_counter()
    cmd, env = _command(args, summary_path, con)
    _train(cmd, env, args.timeout, con)
    with open(summary_path) as f:
        summary = json.load(f)
    os.unlink(summary_path)
    store = open_store(args.url, args.storage_options)
    reports = [store.verify(c.name) for c in store.list()]
    bad = [r for r in reports if not r.ok]
    for r in reports:
        tag = "[green]OK[/]" if r.ok else "[red]FAILED[/]"
        con.print(
            f"  verify {r.name}: {tag} ({r.files_checked} files, "
            f"{human_bytes(r.bytes_checked)} sha256 checked)"
        )
    line = _summary_line(summary, len(reports), len(bad), time.perf_counter() - t0)
    con.print("[bold]summary[/]: " + line)
    con.print(f"  inspect: forge-dist ls {store.display}")
    return EXIT_OK if not bad else EXIT_INTEGRITY


def register(sub: Any, common: argparse.ArgumentParser) -> None:
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
