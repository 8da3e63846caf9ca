"""Keras-side costs of forge_dist, each against a baseline measured in the same run.

    python benchmarks/bench_keras.py [--reps 3] [--skip-save]

1. Per-epoch overhead of SyncMetrics + SyncEarlyStopping under ``mpirun -np 2`` (mpi
   backend), against plain Keras ``EarlyStopping.on_epoch_end`` (target <= 5 ms).
2. Step time of a small MLP (2 x 256 units) with ``DistributedOptimizer`` at 2 ranks vs
   1 rank without it, and the share of the step spent in the gradient all-reduce.
3. Training time lost per checkpoint of the 50 M parameter model (Adam, a 605 MB
   ``.keras``): plain Keras ``ModelCheckpoint`` vs ``ChiefModelCheckpoint``, synchronous
   and asynchronous (fit with a save every epoch minus fit without).
4.-6. The per-epoch overhead of 1. under ``horovodrun --gloo`` and MultiWorkerMirrored-
   Strategy, and tf_keras step time with forge_dist's vs Horovod's optimizer.
7. Bytes written per save at 2 ranks: ``ChiefModelCheckpoint`` vs plain Keras 3
   ``ModelCheckpoint`` (every rank writes).
8. Per-epoch cost of ``ChiefTensorBoard`` (synced scalars, the chief writes and flushes
   each epoch) vs plain Keras ``TensorBoard`` (every rank writes its own), 2 ranks.

Writes benchmarks/out/keras.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_keras_worker.py")
BIN = os.path.dirname(sys.executable)


def mpirun() -> list[str]:
    path = os.path.join(BIN, "mpirun")
    return [path if os.path.exists(path) else "mpirun", "-np", "2", "--oversubscribe"]


def env() -> dict[str, str]:
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1")
    if os.geteuid() == 0:
        e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return e


def horovodrun() -> list[str]:
    path = os.path.join(BIN, "horovodrun")
    return [
        path if os.path.exists(path) else "horovodrun",
        "-np",
        "2",
        "-H",
        "localhost:2",
        "--gloo",
    ]


def worker(
    args: list[str],
    mpi: bool,
    launcher: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict:
    cmd = (launcher if launcher is not None else mpirun() if mpi else []) + [
        sys.executable,
        WORKER,
        *args,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**env(), **(extra_env or {})}, timeout=600
    )
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    # horovodrun prefixes each line with "[rank]<stdout>:".
    lines = [re.sub(r"^\[\d+\]<stdout>:", "", ln) for ln in out.stdout.splitlines()]
    line = [ln for ln in lines if ln.startswith("{")][-1]
    return json.loads(line)


def mwms_epoch() -> dict:
    """Two local MultiWorkerMirroredStrategy workers (what scripts/launch_mwms.sh does)."""
    import socket

    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    for i in range(2):
        e = {
            **env(),
            "TF_USE_LEGACY_KERAS": "1",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, "epoch", "tf"],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"MWMS workers failed:\n{outs[0][1][-2000:]}\n{outs[1][1][-2000:]}")
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def big_model():
    """The 50 M parameter model of FACTS.md (Adam: a 605 MB ``.keras``), trained a step."""
    import numpy as np

    from forge_dist.keras import _compat

    keras = _compat.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((2048,)),
            keras.layers.Dense(8192),
            keras.layers.Dense(4096),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((8, 2048), "float32"), np.zeros((8, 10), "float32"), verbose=0)
    return model


def save_bench(reps: int, epochs: int = 3, steps: int = 20) -> dict:
    """What a checkpoint of the 50 M model costs the training loop, per save, inside
    ``fit`` with a save at every epoch end: plain Keras ``ModelCheckpoint`` (the
    baseline) vs ``ChiefModelCheckpoint`` synchronous and asynchronous.

    The stall is the time the callback holds the loop at the save point. An async save
    also slows the steps that run while its background write goes on (the write shares
    the CPU and memory bandwidth; variables updated after the snapshot are copied on
    write): that is measured within the same fit, as the steps' time beyond the median
    step with no write in flight, and added to give the training time lost per save.
    Interleaved rounds; medians over every save."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from forge_dist.comm import LocalCommunicator
    from forge_dist.keras import ChiefModelCheckpoint, _compat

    keras = _compat.keras
    model = big_model()
    x = np.random.default_rng(0).normal(size=(8 * steps, 2048)).astype("float32")
    y = np.zeros((8 * steps, 10), "float32")
    base = tempfile.mkdtemp(prefix="forge-bench-save-")
    local = LocalCommunicator()

    class Timed(keras.callbacks.Callback):
        """Times the wrapped callback's epoch end, and every step (noting whether a
        background save was in flight at its end)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.held, self.steps = inner, [], []

        def set_model(self, m):
            super().set_model(m)
            self.inner.set_model(m)

        def on_train_begin(self, logs=None):
            self.inner.on_train_begin(logs)

        def on_train_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            bg = getattr(self.inner, "_background", None)
            self.steps.append((time.perf_counter() - self.t, bool(bg and bg.busy)))

        def on_epoch_end(self, epoch, logs=None):
            t = time.perf_counter()
            self.inner.on_epoch_end(epoch, logs)
            self.held.append(time.perf_counter() - t)

        def on_train_end(self, logs=None):
            self.inner.on_train_end(logs)

    def make(kind: str, rep: int):
        root = os.path.join(base, f"{kind}-{rep}")
        if kind == "keras":
            return keras.callbacks.ModelCheckpoint(root + ".keras")
        return ChiefModelCheckpoint(
            root, communicator=local, keep_last=1, async_save=kind == "async"
        )

    kinds = ("keras", "sync", "async")
    held: dict[str, list[float]] = {k: [] for k in kinds}
    slowed: list[float] = []  # per async save: extra step time while it was written
    size = 0
    try:
        for rep in range(reps + 1):  # the first round warms up (and builds the twin)
            for kind in kinds:
                cb = Timed(make(kind, rep))
                os.sync()
                model.fit(
                    x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False, callbacks=[cb]
                )
                if kind == "keras":
                    size = os.path.getsize(os.path.join(base, f"keras-{rep}.keras"))
                if rep:
                    held[kind] += cb.held
                    print(
                        f"   round {rep}, {kind}: held "
                        + ", ".join(f"{h:.2f}" for h in cb.held)
                        + " s",
                        flush=True,
                    )
                    if kind == "async":
                        free = [d for d, busy in cb.steps if not busy]
                        typical = statistics.median(free) if free else 0.0
                        extra = sum(max(0.0, d - typical) for d, busy in cb.steps if busy)
                        slowed.append(extra / epochs)
                shutil.rmtree(os.path.join(base, f"{kind}-{rep}"), ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(base, f"{kind}-{rep}.keras"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in held.items()}
    lost = med["async"] + statistics.median(slowed)
    return {
        "params": int(model.count_params()),
        "file_mb": size / 1e6,
        "epochs": epochs,
        "steps_per_epoch": steps,
        "held_per_save": med,
        "held_all": held,
        "async_steps_slowed_per_save": statistics.median(slowed),
        "stall_per_save": {"keras": med["keras"], "sync": med["sync"], "async": lost},
        "ratio_sync_vs_keras": med["sync"] / med["keras"],
        "ratio_async_stall_vs_keras": med["async"] / med["keras"],
        "ratio_async_vs_keras": lost / med["keras"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-save", action="store_true")
    ap.add_argument("--skip-horovod", action="store_true")
    args = ap.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores"}

    epoch = worker(["epoch", "mpi"], mpi=True)
    results["epoch_overhead"] = epoch
    print(
        f"1. SyncMetrics+SyncEarlyStopping per epoch, 2 ranks: {epoch['forge_ms']:.2f} ms "
        f"(plain Keras EarlyStopping: {epoch['plain_ms']:.3f} ms; target <= 5 ms)"
    )

    # Interleaved repetitions; the median run of each kind (this machine is noisy).
    runs: dict[str, list[dict]] = {"one": [], "two": [], "apart": []}
    for _ in range(args.reps):
        runs["one"].append(worker(["step", "local"], mpi=False))
        runs["two"].append(worker(["step", "mpi"], mpi=True))
        runs["apart"].append(worker(["step-unsynced", "mpi"], mpi=True))
    one, two, apart = (
        sorted(runs[k], key=lambda r: r["step_ms"])[len(runs[k]) // 2]
        for k in ("one", "two", "apart")
    )
    results["step_time"] = {
        "one_rank": one,
        "two_ranks": two,
        "two_ranks_unsynced": apart,
        "ratio": two["step_ms"] / one["step_ms"],
    }
    share = two["allreduce_ms"] / two["step_ms"]
    rest = max(0.0, two["step_ms"] - apart["step_ms"] - two["allreduce_ms"])
    print(
        f"2. small MLP step: {two['step_ms']:.2f} ms at 2 ranks with DistributedOptimizer vs "
        f"{one['step_ms']:.2f} ms at 1 rank without: {two['step_ms'] / one['step_ms']:.2f}x.\n"
        f"   Where it goes: compute {apart['step_ms']:.2f} ms (2 ranks training unsynced), "
        f"all-reduce of {two['gradient_mb']:.2f} MB gradients {two['allreduce_ms']:.2f} ms "
        f"({share:.0%}), the rest {rest:.2f} ms (the host call out of the graph, waiting "
        "for the slower rank)"
    )

    if not args.skip_horovod:
        legacy = {"TF_USE_LEGACY_KERAS": "1"}
        hv_epoch = worker(["epoch", "auto"], False, horovodrun())
        results["epoch_overhead_horovod"] = hv_epoch
        print(
            f"4. SyncMetrics+SyncEarlyStopping per epoch under horovodrun --gloo: "
            f"{hv_epoch['forge_ms']:.2f} ms (plain EarlyStopping {hv_epoch['plain_ms']:.3f} ms)"
        )
        ours, theirs = [], []
        for _ in range(args.reps):
            ours.append(worker(["step", "auto"], False, horovodrun(), legacy)["step_ms"])
            theirs.append(
                worker(["step-horovod-own", "auto"], False, horovodrun(), legacy)["step_ms"]
            )
        mo, mt = statistics.median(ours), statistics.median(theirs)
        results["optimizer_vs_horovod"] = {"forge_ms": ours, "horovod_ms": theirs, "ratio": mo / mt}
        print(
            f"5. tf_keras step under horovodrun, forge_dist.keras.DistributedOptimizer "
            f"{mo:.2f} ms vs Horovod's DistributedOptimizer {mt:.2f} ms = {mo / mt:.2f}x "
            "(target <= 1.1x)"
        )

    root = tempfile.mkdtemp(prefix="forge-bench-bytes-")
    try:
        written = worker(["bytes", "mpi", root], mpi=True)["bytes_per_rank"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    plain_b, forge_b = sum(written["plain"]), sum(written["forge"])
    results["bytes_per_save"] = {**written, "ratio": forge_b / plain_b}
    print(
        f"7. bytes written per save, 2 ranks: ChiefModelCheckpoint {forge_b / 1e6:.2f} MB "
        f"(by rank: {', '.join(f'{b / 1e6:.2f}' for b in written['forge'])}) vs plain Keras "
        f"ModelCheckpoint {plain_b / 1e6:.2f} MB (by rank: "
        f"{', '.join(f'{b / 1e6:.2f}' for b in written['plain'])}) = {forge_b / plain_b:.2f}x"
    )

    root = tempfile.mkdtemp(prefix="forge-bench-tb-")
    try:
        tb = worker(["tensorboard", "mpi", root], mpi=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["tensorboard_epoch"] = tb
    print(
        f"8. TensorBoard per epoch, 2 ranks: ChiefTensorBoard {tb['forge_ms']:.2f} ms vs plain "
        f"Keras TensorBoard {tb['plain_ms']:.2f} ms = {tb['forge_ms'] / tb['plain_ms']:.2f}x"
    )

    mwms = mwms_epoch()
    results["epoch_overhead_mwms"] = mwms
    print(
        f"6. SyncMetrics+SyncEarlyStopping per epoch under MultiWorkerMirroredStrategy "
        f"(2 workers, tf_keras): {mwms['forge_ms']:.2f} ms "
        f"(plain EarlyStopping {mwms['plain_ms']:.3f} ms)"
    )

    if not args.skip_save:
        save = save_bench(args.reps)
        results["checkpoint_50m"] = save
        hd = save["held_per_save"]
        print(
            f"3. checkpoint of the 50M model ({save['file_mb']:.0f} MB), the loop held per "
            f"save: plain Keras ModelCheckpoint {hd['keras']:.2f} s; ChiefModelCheckpoint sync "
            f"{hd['sync']:.2f} s = {save['ratio_sync_vs_keras']:.2f}x; async "
            f"{hd['async'] * 1e3:.0f} ms = {save['ratio_async_stall_vs_keras']:.1%} (target <= "
            f"10%); async with the steps its background write slowed: "
            f"{save['stall_per_save']['async']:.2f} s = {save['ratio_async_vs_keras']:.0%}"
        )
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "keras.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
