"""Resume across ranks: the chief reads and broadcasts, against every rank reading the
verified step itself, at 2, 4 and 8 ranks under ``mpirun`` (one host).

    python benchmarks/bench_resume_ranks.py [--rounds 5] [--ranks 2 4 8]

A 12.6 M-parameter model with Adam (a 151 MB ``.keras`` step; 8 ranks of a 50 M one do
not fit this machine's 24 GiB) is saved once as a forge_dist step in a local root. Each
rank then builds and compiles the model and restores the step, two ways, interleaved
round by round in one ``mpirun``:

- **broadcast** (``read_on="chief"``, the default): the chief lists the root, reads the step once,
  hashing every byte, and sends the weights, optimizer variables and state to every
  other rank over MPI (a star of point-to-point messages from rank 0);
- **every rank reads** (``read_on="every_rank"``):
  the chief picks the step and broadcasts its listing (a few kB); every rank reads the
  step's file itself, hashing every byte against the manifest, and takes its arrays in
  place.

A round is timed from a barrier to the last rank done (the chief's clock, the build
excluded). The step's file is dropped from the page cache before each round; the ranks
share this one host's cache and disk, so every rank reading is a best case for one
shared filesystem and no case of many: the comparison at 16+ hosts reading a bucket
(Orbax reports reading once and broadcasting 0.79× at 2 hosts, 4-5× faster at 16-32)
is not made here. Medians over the rounds after the first. Baseline: **broadcast**.

Writes benchmarks/out/resume_ranks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _out import write_result

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
WAYS = ["broadcast", "every rank reads"]


def model():
    """12.6 M parameters, Adam: a 151 MB ``.keras``."""
    from bench_save import big_model

    return big_model(0, (1024, 4096, 2048))


def save(root: str) -> tuple[int, int]:
    """One trained step of the model in ``root``: ``(parameters, file bytes)``."""
    import numpy as np

    from forge_dist.keras.saving import save_to_store
    from forge_dist.storage import CheckpointStore

    m = model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 1024)).astype("float32")
    y = rng.normal(size=(8, 10)).astype("float32")
    m.fit(x, y, batch_size=8, epochs=1, verbose=0)  # Adam's slots exist
    store = CheckpointStore(root)
    save_to_store(
        store,
        1,
        m,
        weights_only=False,
        metrics={},
        state={"epoch": 0, "epoch_done": True},
        writer={"rank": 0},
    )
    return int(m.count_params()), sum(f.size for f in store.get(1).manifest.files)


def worker(root: str, rounds: int) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import gc

    import numpy as np
    from bench_resume import drop_cache

    from forge_dist.comm.mpi import MPICommunicator
    from forge_dist.keras import _compat, restore_latest

    comm = MPICommunicator(timeout=600)
    keras = _compat.keras
    step_dir = os.path.join(root, sorted(n for n in os.listdir(root) if n.startswith("step-"))[0])
    expected = None
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    for r in range(rounds):
        for way in WAYS if r % 2 == 0 else WAYS[::-1]:
            keras.backend.clear_session()
            gc.collect()
            m = model()
            if comm.is_chief:
                drop_cache([step_dir])
            comm.barrier()
            t0 = time.perf_counter()
            read_on = "chief" if way == "broadcast" else "every_rank"
            restore_latest(m, root, communicator=comm, verbose=0, read_on=read_on)
            comm.barrier()
            times[way].append(time.perf_counter() - t0)
            got = [w.copy() for w in m.get_weights()]
            if expected is None:
                expected = comm.broadcast(got if comm.is_chief else None, name="expected")
            if not all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)):
                raise SystemExit(f"{way}: rank {comm.rank} restored other weights")
            del m, got
    if comm.is_chief:
        print(json.dumps(times), flush=True)
    return 0


def mpirun(ranks: int) -> list[str]:
    path = os.path.join(BIN, "mpirun")
    return [path if os.path.exists(path) else "mpirun", "-np", str(ranks), "--oversubscribe"]


def run(rounds: int, counts: list[int]) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    base = tempfile.mkdtemp(prefix="forge-bench-ranks-")
    out: dict = {"rounds": rounds, "ranks": {}}
    try:
        root = os.path.join(base, "root")
        params, size = save(root)
        out.update(params=params, file_mb=size / 1e6)
        for n in counts:
            cmd = mpirun(n) + [sys.executable, __file__, "--worker", root, str(rounds)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
            if done.returncode or not lines:
                raise SystemExit(f"{n} ranks failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
            times = json.loads(lines[-1])
            med = {w: statistics.median(v[1:] if len(v) > 1 else v) for w, v in times.items()}
            out["ranks"][str(n)] = {
                "seconds": med,
                "ratio_every_rank_vs_broadcast": med["every rank reads"] / med["broadcast"],
            }
            print(
                f"   {n} ranks: broadcast {med['broadcast']:.2f} s, every rank reads "
                f"{med['every rank reads']:.2f} s "
                f"({out['ranks'][str(n)]['ratio_every_rank_vs_broadcast']:.2f}x)",
                flush=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="the first one warms up")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--worker", nargs=2, metavar=("ROOT", "ROUNDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    res = run(args.rounds, args.ranks)
    write_result("resume_ranks", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
