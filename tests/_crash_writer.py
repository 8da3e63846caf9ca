"""Child process for the crash tests: saves step 3 with keep_last=1 retention and stops
at every named point until the parent says "go" (or SIGKILLs it there)."""

import json
import sys

from forge_dist.policy import Retention
from forge_dist.storage import CheckpointStore, _faults


def hook(name: str) -> None:
    print(f"POINT {name}", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("parent went away")


def main() -> None:
    url, options = sys.argv[1], json.loads(sys.argv[2])
    store = CheckpointStore(url, options or None)
    _faults.hook = hook
    with store.writer(3, metrics={"val_loss": 0.1}) as w:
        for name in ("a.bin", "b.bin", "c.bin"):
            w.add_bytes(name, name.encode() * 100_000)
    store.apply_retention(Retention(keep_last=1))
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
