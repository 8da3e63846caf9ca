"""``forge-dist``: the parser and the entry point (docs/DESIGN.md, "The CLI contract").

Exit codes: 0 intact, 1 integrity failure, 2 usage/I-O/credential error,
3 no committed checkpoint at URL. The commands live in :mod:`forge_dist.cli.commands`,
what they print in :mod:`forge_dist.cli.output`, the demo launcher in
:mod:`forge_dist.cli.demo`. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from forge_dist import __version__
from forge_dist._urls import redact_text, redact_url, url_secrets
from forge_dist.cli import commands
from forge_dist.cli.common import (
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_NO_CHECKPOINT,
    EXIT_OK,
    UsageError,
)
from forge_dist.cli.demo import cmd_demo
from forge_dist.cli.output import print_json
from forge_dist.errors import ForgeDistError, IntegrityError, NoCheckpointError
from forge_dist.storage.retention import DEFAULT_GRACE_S

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_NO_CHECKPOINT",
    "EXIT_OK",
    "UsageError",
    "build_parser",
    "main",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every other error
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


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
    v.set_defaults(func=commands.cmd_verify)

    ls = sub.add_parser("ls", parents=[common], help="list committed checkpoints")
    ls.add_argument("url", help="a checkpoint root, or one checkpoint folder")
    ls.add_argument("--monitor", metavar="M", help="mark the best step by this metric")
    ls.add_argument("--mode", choices=("auto", "min", "max"), default="auto")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=commands.cmd_ls)

    ins = sub.add_parser("inspect", parents=[common], help="show one checkpoint's manifest")
    ins.add_argument("url", help="a checkpoint root, or one checkpoint folder")
    ins.add_argument("--step", type=int, help="this step of the root (default: the newest)")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=commands.cmd_inspect)

    ex = sub.add_parser("export", parents=[common], help="a step's model as one local file")
    ex.add_argument("url", help="a checkpoint root, or one checkpoint folder")
    ex.add_argument("out", help="the file to write: NAME.keras or NAME.weights.h5")
    ex.add_argument("--step", type=int, help="this step of the root (default: the newest)")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=commands.cmd_export)

    cp = sub.add_parser("cp", parents=[common], help="copy committed steps to another root")
    cp.add_argument("src", help="a checkpoint root, or one checkpoint folder")
    cp.add_argument("dst", help="the destination root (any URL)")
    cp.add_argument("--step", type=int, help="this step (default: the newest)")
    cp.add_argument("--all", action="store_true", help="every committed step")
    cp.add_argument("--replace", action="store_true", help="overwrite a committed step")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=commands.cmd_cp)

    rm = sub.add_parser("rm", parents=[common], help="remove one committed step")
    rm.add_argument("url", help="a checkpoint root")
    rm.add_argument("--step", type=int, required=True)
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(func=commands.cmd_rm)

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
    put.set_defaults(func=commands.cmd_put)

    gc = sub.add_parser("gc", parents=[common], help="apply retention, remove dead staging")
    gc.add_argument("url")
    gc.add_argument("--keep-last", type=int, required=True, metavar="N")
    gc.add_argument("--keep-best", type=int, metavar="K")
    gc.add_argument("--monitor", metavar="M")
    gc.add_argument(
        "--mode",
        choices=("auto", "min", "max"),
        default="auto",
        help="auto: Keras' rule for the name, else the direction the checkpoints recorded",
    )
    gc.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        metavar="SECONDS",
        help=f"staging unchanged this long counts as abandoned (default {DEFAULT_GRACE_S:g})",
    )
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(func=commands.cmd_gc)
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
        code = (
            EXIT_NO_CHECKPOINT
            if isinstance(e, NoCheckpointError)
            else EXIT_INTEGRITY
            if isinstance(e, IntegrityError)
            else EXIT_ERROR
        )
        secrets = [
            s for a in ("url", "src", "dst") for s in url_secrets(getattr(args, a, "") or "")
        ]
        line = redact_text(" ".join(str(e).split()), secrets) or type(e).__name__
        line = line.replace("pass replace=True", "pass --replace")  # the flag, on the CLI
        if getattr(args, "json", False):
            url = redact_url(getattr(args, "url", None) or getattr(args, "dst", ""))
            print_json(args.command, url, code, ok=False, error=line)
        print(f"forge-dist: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
