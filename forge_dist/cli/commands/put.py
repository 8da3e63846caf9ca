"""``forge-dist put SRC URL --step N [--meta KEY=VALUE ...] [--replace]``."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

from forge_dist.cli.common import EXIT_OK, UsageError, open_store
from forge_dist.cli.output import human_bytes, print_json, stdout_console


def parse_meta(items: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """``--meta`` items: numbers go to the manifest's metrics, text to ``state.meta``."""
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


def _payload_name(src: str) -> str | None:
    """A single Keras file is stored as the payload restore_latest and export read
    (``model.keras``, ``model.weights.h5``); anything else keeps its name."""
    if os.path.isdir(src):
        return None
    lower = src.lower()
    if lower.endswith(".weights.h5"):
        return "model.weights.h5"
    if lower.endswith(".keras"):
        return "model.keras"
    return None


def cmd_put(args: argparse.Namespace) -> int:
    if args.step < 0:
        raise UsageError("--step must be >= 0")
    metrics, meta = parse_meta(args.meta or [])
    store = open_store(args.url, args.storage_options)
    name = _payload_name(args.src)
    t0 = time.perf_counter()
    info = store.put(
        args.src,
        args.step,
        metrics=metrics,
        state={"meta": meta} if meta else None,
        replace=args.replace,
        name=name,
    )
    dt = time.perf_counter() - t0
    m = info.manifest
    if args.json:
        print_json(
            "put",
            store.display,
            EXIT_OK,
            name=info.name,
            step=info.step,
            files=len(m.files),
            bytes=m.total_bytes,
            seconds=round(dt, 3),
        )
    else:
        renamed = f" (as {name})" if name and name != os.path.basename(args.src) else ""
        stdout_console().print(
            f"[green]committed[/] {info.name} to {store.display}: {len(m.files)} files, "
            f"{human_bytes(m.total_bytes)} in {dt:.2f} s{renamed}"
        )
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
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
