"""``forge-dist rm URL --step N``: uncommit one step (its manifest first), then its files."""

from __future__ import annotations

import argparse

from forge_dist.cli.common import EXIT_OK, open_store
from forge_dist.cli.output import print_json, stdout_console


def cmd_rm(args: argparse.Namespace) -> int:
    store = open_store(args.url, args.storage_options)
    store.delete(args.step)  # NoCheckpointError (exit 3) when there is no such step
    if args.json:
        print_json("rm", store.display, EXIT_OK, step=args.step)
    else:
        stdout_console().print(f"removed step {args.step} from {store.display}")
    return EXIT_OK
