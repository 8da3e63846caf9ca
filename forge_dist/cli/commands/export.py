"""``forge-dist export URL [--step N] OUT``: a step's model as one file, verified."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

from forge_dist.cli.common import EXIT_OK, UsageError, resolve_step
from forge_dist.cli.output import human_bytes, print_json, stdout_console

#: What a file name asks for, and the payload file that holds it.
PAYLOADS = ((".weights.h5", "model.weights.h5"), (".keras", "model.keras"))


def cmd_export(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    wanted = next((p for suffix, p in PAYLOADS if out.endswith(suffix)), None)
    if wanted is None:
        raise UsageError(f"OUT must end in .keras or .weights.h5, got {args.out!r}")
    if os.path.exists(out) and not args.force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    store, info = resolve_step(args.url, args.storage_options, args.step)
    files = [e.path for e in info.manifest.files] if info.manifest else []
    suffix = next(s for s, p in PAYLOADS if p == wanted)
    same_kind = [f for f in files if f.endswith(suffix) and "/" not in f]
    if wanted not in files and len(same_kind) == 1:  # e.g. put of "best.keras" (older put)
        wanted = same_kind[0]
    if wanted not in files:
        other = next((suffix for suffix, p in PAYLOADS if p in files), None)
        hint = f": export it as NAME{other}" if other else " (not a Keras checkpoint)"
        raise UsageError(
            f"{info.name} in {store.display} holds {', '.join(files) or 'no files'}, "
            f"not {wanted}{hint}"
        )
    os.makedirs(os.path.dirname(out), exist_ok=True)  # as Keras' save makes its folder
    scratch = tempfile.mkdtemp(prefix="forge-dist-export-", dir=os.path.dirname(out))
    try:
        dest = store.download(info.step, os.path.join(scratch, "step"))  # verified
        os.replace(os.path.join(dest, wanted), out)  # same folder: atomic
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = os.path.getsize(out)
    if args.json:
        print_json(
            "export", store.display, EXIT_OK, name=info.name, step=info.step, out=out, bytes=size
        )
    else:
        stdout_console().print(
            f"exported {info.name}/{wanted} from {store.display} to {out} ({human_bytes(size)}, "
            "sha256 checked)"
        )
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    ex = sub.add_parser("export", parents=[common], help="a step's model as one local file")
    ex.add_argument("url", help="a checkpoint root, or one checkpoint folder")
    ex.add_argument("out", help="the file to write: NAME.keras or NAME.weights.h5")
    ex.add_argument("--step", type=int, help="this step of the root (default: the newest)")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)
