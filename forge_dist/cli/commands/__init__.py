"""One module per ``forge-dist`` command: each declares its arguments (``register``)
next to its handler (``cmd_*``, which takes the parsed arguments and returns the exit
code)."""

from forge_dist.cli.commands import cp, export, gc, inspect, ls, put, rm, verify

#: In the order ``forge-dist --help`` lists them.
COMMANDS = (verify, ls, inspect, export, cp, rm, put, gc)

__all__ = ["COMMANDS"]
