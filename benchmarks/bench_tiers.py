"""What two checkpoint tiers cost training, and what resuming from each tier takes.

    python benchmarks/bench_tiers.py [--rounds 3] [--steps 40] [--epochs 4]

The 12.6 M-parameter model of bench_resume_ranks.py (Adam: a 151 MB ``.keras``), TF at
one thread, random data (in batches from ``bench_save.batches``: tf.data's autotuning
off, whose wait at an epoch's start after a long callback is TensorFlow's). Each round
runs one ``fit`` of ``--epochs`` epochs (a save at each epoch end) per kind, the kinds'
order alternating between rounds:

- **none**: no checkpoint (the clean fit);
- **s3**: ``ChiefModelCheckpoint("s3://…")``: every save straight to the bucket (moto's
  server on 127.0.0.1, in its own process), the loop held until it commits: the baseline;
- **local**: ``ChiefModelCheckpoint(local_folder)``: node-local disk only, nothing durable;
- **tiers**: ``ChiefModelCheckpoint("s3://…", local_directory=local_folder)``: committed
  locally, copied to the bucket in the background.

**Lost per save** is (the kind's fit − the clean fit) / saves: the hold at each save, the
background copy competing with training (on this 2-core VM, with moto's server a third
party), and the wait at train end for the last copy to be durable (charged in full). An
epoch should outlast a copy (``--steps``), as saves a few minutes apart do; with saves
closer than a copy takes, the copies queue and the end of training waits for them all.

Then the time to resume (``restore_latest`` into the built model, every byte hashed),
interleaved over the rounds: from the local tier (page cache dropped first) and from
the durable tier alone (``local_directory`` an empty folder: a job requeued onto another
node). Medians over the rounds after the first (warm-up).

Writes benchmarks/out/tiers.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from _out import write_result


def run(rounds: int, steps: int, epochs: int) -> dict:
    from _s3 import s3_endpoint
    from bench_resume import drop_cache
    from bench_save import batches, big_model, limit_threads

    limit_threads()
    import numpy as np

    from forge_dist.comm import LocalCommunicator
    from forge_dist.keras import ChiefModelCheckpoint, restore_latest

    model = big_model(0, (1024, 4096, 2048))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * steps, 1024)).astype("float32")
    y = rng.normal(size=(8 * steps, 10)).astype("float32")
    data = batches(x, y)  # tf.data's autotuning off: see bench_save.py
    tmp = tempfile.mkdtemp(prefix="forge-bench-tiers-")
    comm = LocalCommunicator()
    try:
        with s3_endpoint() as (options, _):
            local_dir = os.path.join(tmp, "local")

            def saver(kind: str) -> ChiefModelCheckpoint | None:
                if kind == "s3":
                    return ChiefModelCheckpoint(
                        "s3://bench/direct",
                        storage_options=options,
                        communicator=comm,
                        keep_last=1,
                    )
                if kind == "local":
                    return ChiefModelCheckpoint(
                        os.path.join(tmp, "alone"), communicator=comm, keep_last=1
                    )
                if kind == "tiers":
                    return ChiefModelCheckpoint(
                        "s3://bench/tiers",
                        storage_options=options,
                        local_directory=local_dir,
                        communicator=comm,
                        keep_last=1,
                        local_keep_last=1,
                    )
                return None

            kinds = ["s3", "local", "tiers"]
            fits: dict[str, list[float]] = {k: [] for k in ["none", *kinds]}
            copies: list[float] = []
            for r in range(rounds):
                order = ["none", *kinds]
                for kind in order if r % 2 == 0 else reversed(order):
                    cb = saver(kind)
                    os.sync()  # untimed: no earlier fit's dirty pages land in this one
                    t0 = time.perf_counter()
                    model.fit(
                        data,
                        epochs=epochs,
                        verbose=0,
                        shuffle=False,
                        callbacks=[] if cb is None else [cb],
                    )
                    fits[kind].append(time.perf_counter() - t0)
                    if kind == "tiers":
                        copies += cb.replicator.copy_seconds
            base = statistics.median(fits["none"][1:])
            lost = {k: (statistics.median(fits[k][1:]) - base) / epochs for k in kinds}
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
    res = {k: statistics.median(v[1:]) for k, v in resume.items()}
    out = dict(
        params=int(model.count_params()),
        kinds=kinds,
        rounds=rounds,
        steps_per_epoch=steps,
        epochs=epochs,
        fit_s=fits,
        clean_fit_s=base,
        lost=lost,
        copy_s=statistics.median(copies) if copies else None,
        lost_vs_s3={k: lost[k] / lost["s3"] for k in kinds},
        resume_s=res,
        resume_all=resume,
        resume_local_vs_durable=res["local tier"] / res["durable tier"],
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="the first one warms up")
    ap.add_argument("--steps", type=int, default=40, help="steps an epoch")
    ap.add_argument("--epochs", type=int, default=4, help="epochs a fit (a save each)")
    args = ap.parse_args()
    res = run(args.rounds, args.steps, args.epochs)
    print(
        f"checkpoint of the {res['params'] / 1e6:.1f} M-param model, TF at 1 thread, a fit "
        f"of {args.epochs} epochs without saves takes {res['clean_fit_s']:.2f} s; a "
        f"background copy to S3 {res['copy_s']:.2f} s:"
    )
    for kind in res["kinds"]:
        print(
            f"   {kind:>6}: lost per save {res['lost'][kind]:.3f} s "
            f"({res['lost_vs_s3'][kind]:.2f}x s3)"
        )
    for kind, t in res["resume_s"].items():
        print(f"   resume from the {kind}: {t:.2f} s")
    print(f"   local tier / durable tier: {res['resume_local_vs_durable']:.2f}x")
    write_result("tiers", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
