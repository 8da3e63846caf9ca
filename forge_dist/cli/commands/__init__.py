"""One module per ``forge-dist`` command; each ``cmd_*`` takes the parsed arguments and
returns the exit code."""

from forge_dist.cli.commands.cp import cmd_cp
from forge_dist.cli.commands.export import cmd_export
from forge_dist.cli.commands.gc import cmd_gc
from forge_dist.cli.commands.inspect import cmd_inspect
from forge_dist.cli.commands.ls import cmd_ls
from forge_dist.cli.commands.put import cmd_put
from forge_dist.cli.commands.rm import cmd_rm
from forge_dist.cli.commands.verify import cmd_verify

__all__ = [
    "cmd_cp",
    "cmd_export",
    "cmd_gc",
    "cmd_inspect",
    "cmd_ls",
    "cmd_put",
    "cmd_rm",
    "cmd_verify",
]
