"""``forge-dist export URL [--step N] OUT``: a step's model as one file, verified."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

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
    if wanted not in files:
        other = next((suffix for suffix, p in PAYLOADS if p in files), None)
        hint = f": export it as NAME{other}" if other else " (not a Keras checkpoint)"
        raise UsageError(
            f"{info.name} in {store.display} holds {', '.join(files) or 'no files'}, "
            f"not {wanted}{hint}"
        )
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
