"""Child process for the file crash tests: writes save 2 of a file (``FileTarget``) and
stops at every named point until the parent says "go" (or SIGKILLs it there)."""

import json
import sys

from _crash_writer import hook  # (this folder is on the path: the same handshake)

from forge_dist.storage import _faults
from forge_dist.storage.files import FileTarget


def main() -> None:
    url, options = sys.argv[1], json.loads(sys.argv[2])
    target = FileTarget(url, options or None)
    _faults.hook = hook
    target.write(lambda f: f.write(b"save 2" * 1000), {"epoch": 1})
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
