"""Program for tests/test_e2e_restore_ranks.py, under ``mpirun -np 2``: ``restore_latest``
with every rank reading, where rank 1 sees the chief's root, sees nothing there, or
sees another copy with a flipped byte.

    mpirun -np 2 python _restore_ranks.py BASE OUT

BASE (made by the test) holds ``shared/`` (a checkpoint root both ranks see),
``private/local``, ``private/flipped`` (copies of it), ``private/chief-flipped`` (a
copy whose newest step file has one byte flipped) and ``flipped-src/`` (the same). Rank 1
first moves into a mount namespace of its own and mounts a tmpfs of its own on
``private/``, as a node-local disk on another node: there it sees no ``local`` root, as
``flipped`` the flipped copy and as ``chief-flipped`` an intact one. Each rank writes to
OUT (``{rank}`` replaced) what it read (sizes, or the errors), the largest message the
chief broadcast, and whether its weights equal ``BASE/expected.npz`` (``BASE/older.npz``
for ``chief-flipped``, whose newest step the chief finds corrupt).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
BASE, OUT = sys.argv[1], sys.argv[2]
RANK = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
CLONE_NEWNS = 0x00020000

if RANK == 1:  # before any thread exists: the namespace is this thread's
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNS) != 0:
        raise SystemExit(f"unshare: {os.strerror(ctypes.get_errno())}")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True, timeout=30)
    private = os.path.join(BASE, "private")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", private], check=True, timeout=30)
    shutil.copytree(os.path.join(BASE, "flipped-src"), os.path.join(private, "flipped"))
    shutil.copytree(os.path.join(BASE, "shared"), os.path.join(private, "chief-flipped"))

import pickle  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kerashelp import make_model  # noqa: E402

from forge_dist.comm import get_communicator  # noqa: E402
from forge_dist.keras import restore_latest  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402

comm = get_communicator("mpi")
read: list[int] = []
direct: list[bool] = []  # each read's: around the page cache, or through it
sent: list[int] = []
read_verified = CheckpointStore.read_verified
broadcast = type(comm).broadcast


def counted_read(self, step, path, around_cache=True):
    direct.append(around_cache)
    try:
        buf = read_verified(self, step, path, around_cache)
    except Exception as e:
        read.append(type(e).__name__)
        raise
    read.append(len(buf))
    return buf


def counted_broadcast(self, obj, root=0, name="broadcast"):
    if self.rank == root:
        sent.append(len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
    return broadcast(self, obj, root, name)


CheckpointStore.read_verified = counted_read
type(comm).broadcast = counted_broadcast
report = {}
for case, root, read_on in (
    ("shared", "shared", "every_rank"),
    ("chief", "shared", "chief"),
    ("local", "private/local", "every_rank"),
    ("flipped", "private/flipped", "every_rank"),
    ("chief-flipped", "private/chief-flipped", "every_rank"),
):
    npz = "older.npz" if case == "chief-flipped" else "expected.npz"
    expected = list(np.load(os.path.join(BASE, npz)).values())
    read.clear()
    direct.clear()
    sent.clear()
    model = make_model(units=2048, seed=11)
    r = restore_latest(
        model, os.path.join(BASE, root), communicator=comm, verbose=0, read_on=read_on
    )
    got = model.get_weights()
    report[case] = {
        "step": r.step,
        "initial_epoch": r.initial_epoch,
        "reads": list(read),
        "direct": list(direct),
        "largest_broadcast": max(sent, default=0),
        "equal": len(got) == len(expected)
        and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)),
        "sees_root": os.path.isdir(os.path.join(BASE, root)),
    }
with open(OUT.replace("{rank}", str(comm.rank)), "w") as f:
    json.dump(report, f)
