"""A writer process for the fencing test: takes the root's lease, stages a step, waits
for "go" on stdin, then tries to commit it (or to delete a step) and says what happened.

    python _lease_writer.py URL OPTIONS_JSON STEP commit|delete:N [POINT]

With POINT (a named point of the save path, storage/_faults.py) the writer also stops
there, says "POINT <name>" and waits for another "go": the parent makes a takeover land
at exactly that instant.
"""

from __future__ import annotations

import json
import sys

from forge_dist.errors import StaleWriterError
from forge_dist.storage import CheckpointStore, _faults

url, options, step, action = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pause_at = sys.argv[5] if len(sys.argv) > 5 else None


def hook(name: str) -> None:
    if name == pause_at:
        print("POINT", name, flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("no go")


_faults.hook = hook
store = CheckpointStore(url, options or None)
lease = store.take_lease(f"run-{step}")
print("LEASED", lease.generation, flush=True)
writer = store.writer(step, lease=lease)
writer.begin()
writer.add_bytes("model.bin", b"x" * 1000)
print("STAGED", flush=True)
if sys.stdin.readline().strip() != "go":
    raise SystemExit("no go")
try:
    if action == "commit":
        writer.commit()
    else:
        writer.abort()
        store.delete(int(action.split(":")[1]), lease=lease)
    print("DONE", flush=True)
except StaleWriterError as e:
    print("STALE", " ".join(str(e).split()), flush=True)
