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
from forge_dist.cli import commands, demo
from forge_dist.cli.common import (
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_NO_CHECKPOINT,
    EXIT_OK,
    UsageError,
)
from forge_dist.cli.output import print_json
from forge_dist.errors import ForgeDistError, IntegrityError, NoCheckpointError

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

    for command in (*commands.COMMANDS, demo):
        command.register(sub, common)
    return p


_SECRET_KEYS = ("key", "secret", "token", "password", "credential", "connection_string", "sas")


def _option_secrets(args: argparse.Namespace) -> list[str]:
    """The values of ``--storage-options`` / ``--dst-storage-options`` whose names say
    they are secrets (``secret``, ``account_key``, ``sas_token``, ...), at any depth."""
    import json

    found: list[str] = []

    def walk(value: Any, name: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k).lower())
        elif isinstance(value, str) and any(word in name for word in _SECRET_KEYS):
            found.append(value)

    for flag in ("storage_options", "dst_storage_options"):
        try:
            walk(json.loads(getattr(args, flag, None) or "{}"))
        except ValueError:
            continue
    return found


_STORAGE_LOGGERS = ("gcsfs", "adlfs", "azure", "s3fs", "botocore", "aiobotocore", "google")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        # A storage library logs the error it then raises (gcsfs with its traceback): the
        # user gets it once, as the command's one line.
        for name in _STORAGE_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
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
        ] + _option_secrets(args)
        line = redact_text(" ".join(str(e).split()), secrets) or type(e).__name__
        line = line.replace("pass replace=True", "pass --replace")  # the flag, on the CLI
        if getattr(args, "json", False):
            url = redact_url(getattr(args, "url", None) or getattr(args, "dst", ""))
            print_json(args.command, url, code, ok=False, error=line)
        print(f"forge-dist: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
