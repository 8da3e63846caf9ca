"""``forge-dist rm URL --step N`` (or ``rm URL/step-N``): uncommit one step (its manifest
first), then its files."""

from __future__ import annotations

import argparse
from typing import Any

from forge_dist.cli.common import EXIT_OK, UsageError, resolve
from forge_dist.cli.output import print_json, stdout_console


def cmd_rm(args: argparse.Namespace) -> int:
    from forge_dist.storage.manifest import parse_step_dirname

    store, name = resolve(args.url, args.storage_options)
    step = args.step
    if name is not None:  # URL is the step's folder
        if step is not None and step != parse_step_dirname(name):
            raise UsageError(f"--step {step} names another step than {name}")
        step = parse_step_dirname(name)
    if step is None:
        raise UsageError("which step? pass --step N, or the step's folder as URL")
    store.delete(step)  # NoCheckpointError (exit 3) when there is no such step
    if args.json:
        print_json("rm", store.display, EXIT_OK, step=step)
    else:
        stdout_console().print(f"removed step {step} from {store.display}")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    rm = sub.add_parser("rm", parents=[common], help="remove one committed step")
    rm.add_argument("url", help="a checkpoint root (with --step), or one step's folder")
    rm.add_argument("--step", type=int)
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(func=cmd_rm)
