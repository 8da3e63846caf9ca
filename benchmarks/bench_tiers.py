"""What two checkpoint tiers cost training, and what resuming from each tier takes.

    python benchmarks/bench_tiers.py [--rounds 4] [--steps 10] [--block-epochs 2]

The 12.6 M-parameter model of bench_resume_ranks.py (Adam: a 151 MB ``.keras``), TF at
one thread, in bench_save.py's interleaved schedule: blocks that begin with a save
alternate with clean blocks, and three savers take turns within the same fit:

- **s3**: ``ChiefModelCheckpoint("s3://…")``: the save goes straight to the bucket
  (moto's server on 127.0.0.1, in its own process), the loop held until it commits;
- **local**: ``ChiefModelCheckpoint(local_folder)``: node-local disk only, nothing
  durable (the floor);
- **tiers**: ``ChiefModelCheckpoint("s3://…", local_directory=local_folder)``: committed
  locally, copied to the bucket in the background.

**held** is the time the loop stood at the save point; **lost** the save block's time
minus the mean of the clean blocks beside it, which for **tiers** includes the copy
competing with training and, if the copy outlasts the block, the wait for it at the
block's end (so it is charged in full, never to a later block). Baselines: **s3** (what
a job writing to its bucket pays) and **local**.

Then the time to resume (``restore_latest`` into the built model, every byte hashed),
interleaved over the rounds: from the local tier (page cache dropped first) and from
the durable tier alone (``local_directory`` an empty folder: a job requeued onto another
node). Medians over the rounds after the first (warm-up).

Writes benchmarks/out/tiers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time


def run(rounds: int, steps: int, block_epochs: int) -> dict:
    from _s3 import s3_endpoint
    from bench_resume import drop_cache
    from bench_save import big_model, costs, interleaved, limit_threads

    limit_threads()
    import numpy as np

    from forge_dist.comm import LocalCommunicator
    from forge_dist.keras import ChiefModelCheckpoint, restore_latest

    model = big_model(0, (1024, 4096, 2048))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * steps, 1024)).astype("float32")
    y = rng.normal(size=(8 * steps, 10)).astype("float32")
    tmp = tempfile.mkdtemp(prefix="forge-bench-tiers-")
    comm = LocalCommunicator()
    try:
        with s3_endpoint() as (options, _):
            local_dir = os.path.join(tmp, "local")
            inner = {
                "s3": ChiefModelCheckpoint(
                    "s3://bench/direct", storage_options=options, communicator=comm, keep_last=1
                ),
                "local": ChiefModelCheckpoint(
                    os.path.join(tmp, "alone"), communicator=comm, keep_last=1
                ),
                "tiers": ChiefModelCheckpoint(
                    "s3://bench/tiers",
                    storage_options=options,
                    local_directory=local_dir,
                    communicator=comm,
                    keep_last=1,
                    local_keep_last=1,
                ),
            }
            kinds = list(inner)
            cb = interleaved(inner, block_epochs)
            epochs = rounds * 2 * len(kinds) * block_epochs
            model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False, callbacks=[cb])
            out = costs(cb.blocks, kinds)
            copies = inner["tiers"].replicator.copy_seconds
            resume: dict[str, list[float]] = {"local tier": [], "durable tier": []}
            empty = os.path.join(tmp, "another-node")
            for r in range(rounds):
                order = list(resume) if r % 2 == 0 else list(reversed(resume))
                for kind in order:
                    drop_cache([local_dir])
                    t0 = time.perf_counter()
                    got = restore_latest(
                        model,
                        "s3://bench/tiers",
                        storage_options=options,
                        communicator=comm,
                        local_directory=local_dir if kind == "local tier" else empty,
                        verbose=0,
                    )
                    resume[kind].append(time.perf_counter() - t0)
                    assert got.restored
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    held, lost = out["held"], out["lost"]
    res = {k: statistics.median(v[1:]) for k, v in resume.items()}
    out.update(
        params=int(model.count_params()),
        kinds=kinds,
        rounds=rounds,
        steps_per_epoch=steps,
        block_epochs=block_epochs,
        blocks=cb.blocks,
        copy_s=statistics.median(copies) if copies else None,
        lost_vs_s3={k: lost[k] / lost["s3"] for k in kinds},
        held_vs_s3={k: held[k] / held["s3"] for k in kinds},
        resume_s=res,
        resume_all=resume,
        resume_local_vs_durable=res["local tier"] / res["durable tier"],
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="the first one warms up")
    ap.add_argument("--steps", type=int, default=10, help="steps an epoch")
    ap.add_argument("--block-epochs", type=int, default=2)
    args = ap.parse_args()
    res = run(args.rounds, args.steps, args.block_epochs)
    print(
        f"checkpoint of the {res['params'] / 1e6:.1f} M-param model, TF at 1 thread, a clean "
        f"block takes {res['clean_block_s']:.2f} s; a background copy to S3 "
        f"{res['copy_s']:.2f} s:"
    )
    for kind in res["kinds"]:
        print(
            f"   {kind:>6}: held {res['held'][kind]:.3f} s ({res['held_vs_s3'][kind]:.2f}x s3), "
            f"lost {res['lost'][kind]:.3f} s ({res['lost_vs_s3'][kind]:.2f}x s3)"
        )
    for kind, t in res["resume_s"].items():
        print(f"   resume from the {kind}: {t:.2f} s")
    print(f"   local tier / durable tier: {res['resume_local_vs_durable']:.2f}x")
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(os.path.join(here, "out"), exist_ok=True)
    with open(os.path.join(here, "out", "tiers.json"), "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
