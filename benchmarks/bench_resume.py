"""What a verified resume costs against a plain Keras load, measured the interleaved way.

    python benchmarks/bench_resume.py [--rounds 5] [--params-m 50] [--no-s3]

The 50 M-parameter model of bench_save.py (Adam, after one step: a 605 MB ``.keras``),
saved once as ``plain.keras`` by ``model.save`` and once as a forge_dist step (the
checkpoint callback's save) in a local root and in an S3 root on moto's server on
127.0.0.1. Each figure is *from nothing to a model ready to train*:

- **keras**: ``keras.models.load_model("plain.keras")``: no check of any byte;
- **forge**: build and compile the model, then ``restore_latest(model, root)``: every
  byte of the step hashed against its manifest (``verify="full"``, the default);
- **s3 keras**: ``s3fs get`` of ``plain.keras`` into a local file, then ``load_model``;
- **s3 forge**: build and compile, then ``restore_latest(model, "s3://…")``.

How the step's file is read was chosen by measuring, in the same run, a cold read of it
(no hash) three ways: one buffered read at a time, four buffered positional reads in
flight, and four ``O_DIRECT`` reads in flight into page-aligned memory (what
``read_all_hashed`` does for a local file where the filesystem allows); 8 MiB requests.
Baseline: one read at a time.

Local figures start from a cold page cache: every file involved is written out
(``os.sync``) and dropped from the cache (``posix_fadvise(DONTNEED)``) before each load.
moto keeps its objects in memory, so the S3 figures are of HTTP and the client, not of a
disk. Rounds alternate the order of the kinds; medians over the rounds after the first
(which warms up). Baselines: **keras** for **forge**, **s3 keras** for **s3 forge**.

Writes benchmarks/out/resume.json (``resume-200m.json`` for ``--params-m 200``, …).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from _out import sized, write_result

KINDS = ["keras", "forge", "s3 keras", "s3 forge"]
READS = ["one at a time", "4 in flight", "O_DIRECT, 4 in flight"]
REQUEST = 8 * 1024 * 1024


def drop_cache(paths: list[str]) -> None:
    """Every file under ``paths`` written out and dropped from the page cache."""
    os.sync()
    for top in paths:
        files = [top] if os.path.isfile(top) else []
        for d, _, names in os.walk(top):
            files += [os.path.join(d, n) for n in names]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_file(path: str, how: str) -> int:
    """Bytes of ``path`` read into memory the way ``how`` names (one of READS)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    size = os.path.getsize(path)
    # Page-aligned memory and lengths, as O_DIRECT needs (the last read comes back short).
    buf = mmap.mmap(-1, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
    view = memoryview(buf)
    flags = os.O_RDONLY | (os.O_DIRECT if how.startswith("O_DIRECT") else 0)
    fd = os.open(path, flags)
    try:
        if how == "one at a time":
            return sum(os.preadv(fd, [view[o : o + REQUEST]], o) for o in range(0, size, REQUEST))
        with ThreadPoolExecutor(4) as pool:
            return sum(
                pool.map(
                    lambda o: os.preadv(fd, [view[o : o + REQUEST]], o), range(0, size, REQUEST)
                )
            )
    finally:
        os.close(fd)
        view.release()
        buf.close()


def read_modes(path: str, rounds: int) -> dict:
    """Seconds of a cold read of ``path`` in each of READS, interleaved; medians after
    the first round."""
    times: dict[str, list[float]] = {k: [] for k in READS}
    for r in range(rounds):
        for how in READS if r % 2 == 0 else READS[::-1]:
            drop_cache([path])
            t0 = time.perf_counter()
            if read_file(path, how) != os.path.getsize(path):
                raise SystemExit(f"{how}: a short read of {path}")
            times[how].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}


def run(
    rounds: int,
    params_m: float = 50,
    s3: bool = True,
    *,
    scope=None,
    widths: tuple[int, int, int] = (2048, 8192, 4096),
) -> dict:
    """``scope``: makes the context every model is built and loaded in (a
    ``tf.distribute`` strategy's ``scope``, for device-resident variables)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import contextlib

    import numpy as np
    from bench_save import big_model

    def built(params_m: float):
        with scope() if scope else contextlib.nullcontext():
            return big_model(params_m, widths)

    if s3:
        import s3fs
        from _s3 import s3_endpoint

    from forge_dist.comm import LocalCommunicator
    from forge_dist.keras import _compat, restore_latest
    from forge_dist.keras.saving import MODEL_FILE, save_to_store
    from forge_dist.storage import CheckpointStore
    from forge_dist.storage.manifest import step_dirname

    keras = _compat.keras
    local = LocalCommunicator()
    base = tempfile.mkdtemp(prefix="forge-bench-resume-")
    try:
        kinds = KINDS if s3 else [k for k in KINDS if not k.startswith("s3")]
        with s3_endpoint() if s3 else contextlib.nullcontext((None, None)) as (options, _):
            model = built(params_m)
            rng = np.random.default_rng(0)
            x = rng.normal(size=(8, widths[0])).astype("float32")
            y = rng.normal(size=(8, 10)).astype("float32")
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # Adam's slots exist
            plain = os.path.join(base, "plain.keras")
            model.save(plain)
            fs = s3fs.S3FileSystem(**options) if s3 else None
            roots = {"forge": os.path.join(base, "root")}
            if fs is not None:
                fs.put(plain, "bench/plain.keras")
                roots["s3 forge"] = "s3://bench/root"
            for root in roots.values():
                store = CheckpointStore(root, options if root.startswith("s3") else None)
                save_to_store(
                    store,
                    1,
                    model,
                    weights_only=False,
                    metrics={},
                    state={"epoch": 0, "epoch_done": True},
                    writer={"rank": 0},
                )
            params, size = int(model.count_params()), os.path.getsize(plain)
            step_file = os.path.join(roots["forge"], step_dirname(1), MODEL_FILE)
            reads = read_modes(step_file, rounds)
            expected = [w.copy() for w in model.get_weights()]
            del model

            def keras_load() -> object:
                with scope() if scope else contextlib.nullcontext():
                    return keras.models.load_model(plain)

            def forge_load(root: str) -> object:
                fresh = built(params_m)
                opts = options if root.startswith("s3") else None
                with scope() if scope else contextlib.nullcontext():
                    restore_latest(fresh, root, opts, communicator=local, verbose=0)
                return fresh

            def s3_keras_load() -> object:
                got = os.path.join(base, "got.keras")
                fs.get("bench/plain.keras", got)
                try:
                    return keras.models.load_model(got)
                finally:
                    os.remove(got)

            loads = {
                "keras": keras_load,
                "forge": lambda: forge_load(roots["forge"]),
                "s3 keras": s3_keras_load,
                "s3 forge": lambda: forge_load(roots.get("s3 forge", "")),
            }
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for r in range(rounds):
                order = kinds if r % 2 == 0 else kinds[::-1]
                for kind in order:
                    keras.backend.clear_session()
                    gc.collect()
                    drop_cache([plain, roots["forge"]])
                    t0 = time.perf_counter()
                    loaded = loads[kind]()
                    times[kind].append(time.perf_counter() - t0)
                    got = loaded.get_weights()  # type: ignore[attr-defined]
                    if not all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)):
                        raise SystemExit(f"{kind}: the loaded weights differ from the saved ones")
                    del loaded, got
                print(
                    f"   round {r}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in kinds),
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    kept = {k: v[1:] if len(v) > 1 else v for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in kept.items()}
    return {
        "params": params,
        "file_mb": size / 1e6,
        "rounds": rounds,
        "seconds": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in kept.items()},
        "ratios": {
            "forge_vs_keras_load": med["forge"] / med["keras"],
            **({"s3_forge_vs_s3fs_get_and_load": med["s3 forge"] / med["s3 keras"]} if s3 else {}),
        },
        "read_seconds": reads,
        "read_gb_per_s": {k: size / 1e9 / v for k, v in reads.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="the first one warms up")
    ap.add_argument(
        "--params-m", type=float, default=50, help="model size, M parameters (50, 200, 400)"
    )
    ap.add_argument(
        "--no-s3", action="store_true", help="local kinds only (moto holds objects in memory)"
    )
    args = ap.parse_args()
    res = run(args.rounds, args.params_m, not args.no_s3)
    s, r = res["seconds"], res["ratios"]
    on_s3 = (
        f"   S3 (moto): s3fs get + load_model {s['s3 keras']['median']:.2f} s; build + "
        f"verified restore {s['s3 forge']['median']:.2f} s "
        f"({r['s3_forge_vs_s3fs_get_and_load']:.2f}x)\n"
        if "s3 forge" in s
        else ""
    )
    print(
        f"resume of the {res['params'] / 1e6:.0f} M-param model ({res['file_mb']:.0f} MB), "
        f"medians of {args.rounds - 1} rounds:\n"
        f"   local, cold cache: load_model {s['keras']['median']:.2f} s; build + verified "
        f"restore {s['forge']['median']:.2f} s ({r['forge_vs_keras_load']:.2f}x)\n"
        + on_s3
        + "   cold read of the step's file: "
        + ", ".join(f"{k} {v:.2f} GB/s" for k, v in res["read_gb_per_s"].items())
    )
    write_result(sized("resume", args.params_m), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
