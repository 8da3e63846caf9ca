"""``forge-dist cp SRC DST [--step N | --all] [--replace]``: committed steps into another
root or store, verified while read, committed by the destination's protocol."""

from __future__ import annotations

import argparse
from typing import Any

from forge_dist.cli.common import EXIT_OK, UsageError, open_store, resolve
from forge_dist.cli.output import human_bytes, print_json, stdout_console
from forge_dist.errors import NoCheckpointError


def cmd_cp(args: argparse.Namespace) -> int:
    if args.step is not None and args.all:
        raise UsageError("--step and --all cannot be used together")
    src, name = resolve(args.src, args.storage_options)
    dst = open_store(args.dst, _dst_options(args), "--dst-storage-options")
    if name is not None:
        info = src.info(name)
        if info is None:
            raise NoCheckpointError(f"no committed {name} in {src.display}")
        steps = [info.step]
    else:
        committed = [c.step for c in src.list()]
        if args.step is not None:
            steps = [s for s in committed if s == args.step]
        else:
            steps = committed if args.all else committed[-1:]
    if not steps:
        what = f"step {args.step}" if args.step is not None else "committed checkpoint"
        raise NoCheckpointError(f"no {what} in {src.display}")
    copied = [src.copy_to(dst, s, replace=args.replace) for s in steps]
    total = sum(c.manifest.total_bytes for c in copied if c.manifest)
    if args.json:
        print_json("cp", dst.display, EXIT_OK, source=src.display, steps=steps, bytes=total)
    else:
        stdout_console().print(
            f"copied {len(copied)} step(s) ({', '.join(map(str, steps))}, {human_bytes(total)}) "
            f"from {src.display} to {dst.display}, sha256 checked"
        )
    return EXIT_OK


def _store_kind(url: str) -> str:
    """The backend a URL gets (``s3`` and ``s3a`` are one kind), or its protocol."""
    from forge_dist.storage.backends import PROTOCOLS

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    entry = PROTOCOLS.get(protocol)
    return entry.backend if entry else protocol


def _dst_options(args: argparse.Namespace) -> str | None:
    """The destination's options: its own; else ``--storage-options`` when the source is
    local (they can only be the destination's) or of the same kind (S3 options mean
    nothing to Azure: credentials come from the environment there)."""
    if args.dst_storage_options is not None:
        return args.dst_storage_options
    src = _store_kind(args.src)
    same = src == _store_kind(args.dst) or src == _store_kind("/")
    return args.storage_options if same else None


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    cp = sub.add_parser("cp", parents=[common], help="copy committed steps to another root")
    cp.add_argument("src", help="a checkpoint root, or one checkpoint folder")
    cp.add_argument("dst", help="the destination root (any URL)")
    cp.add_argument(
        "--dst-storage-options",
        metavar="JSON",
        help="fsspec storage options of the destination (default: --storage-options when "
        "both roots have the same protocol, else none)",
    )
    cp.add_argument("--step", type=int, help="this step (default: the newest)")
    cp.add_argument("--all", action="store_true", help="every committed step")
    cp.add_argument("--replace", action="store_true", help="overwrite a committed step")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_cp)
