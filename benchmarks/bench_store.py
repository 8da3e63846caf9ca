"""Checkpoint store speed against plain tools, measured in the same run.

    python benchmarks/bench_store.py [--size-mb 500] [--reps 5] [--cloud-reps 11] [--dir PATH]

Builds a checkpoint of several files (default 500 MB in all) on local disk, then times,
interleaved, repetition by repetition:

* commit through the store (``CheckpointStore.put`` in this process, as the callbacks
  commit, and ``forge-dist put`` as a new process: hash while writing, fsync every file,
  manifest, rename, fsync the root) vs a durable plain copy of the same bytes (``cp -r``
  then ``sync -f`` on the target filesystem: the same guarantee), and vs ``cp -r`` alone
  (page cache only: what a crash can tear);
* ``forge-dist verify`` (sha256 of every byte, files hashed in parallel) vs
  ``sha256sum`` of the same files (and ``openssl dgst -sha256`` where installed), both
  on a warm page cache.

Every timed command starts after ``sync``, so no run pays for the previous one's
writeback.

Then the same on each cloud's local HTTP endpoint on 127.0.0.1 (``--clouds``: moto's S3
server through s3fs, Azurite through adlfs, fake-gcs-server through gcsfs;
``--s3-size-mb``, default 100): commit through the store vs a plain upload of the same
files (the same client's ``put``, no manifest), and ``verify`` vs reading every object
back and hashing it with ``hashlib.sha256`` one after the other; then 20 saves through a
faulty network. A cloud's ratios are medians of each repetition's own ratio (its two
operations ran back to back), which the endpoint's swings from one repetition to the
next do not move as they move a ratio of two medians.

Prints medians and ratios (lower is better for time ratios, higher for throughput),
and writes them to benchmarks/out/store.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _clouds import CLIENTS, NAMES
from _out import write_result

from forge_dist.policy import Retention

HERE = os.path.dirname(os.path.abspath(__file__))
FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")
#: Fractions of the total: one big weight file, a few smaller ones (like a sharded save).
SHARES = (0.5, 0.2, 0.15, 0.1, 0.05)


def make_payload(path: str, total_mb: int) -> int:
    os.makedirs(path)
    block = os.urandom(1 << 20)
    total = 0
    for i, share in enumerate(SHARES):
        n = max(1, int(total_mb * share))
        with open(os.path.join(path, f"shard-{i}.bin"), "wb") as f:
            for j in range(n):
                # Vary blocks so no layer can deduplicate them.
                f.write(j.to_bytes(8, "little") + block[8:])
        total += n << 20
    return total


def commit_in_process(src: str, root: str, step: int) -> float:
    """``CheckpointStore(root).put(src, step)``, as ChiefModelCheckpoint commits."""
    from forge_dist.storage import CheckpointStore

    os.sync()
    t0 = time.perf_counter()
    CheckpointStore(root).put(src, step)
    return time.perf_counter() - t0


def timed(cmd: list[str]) -> float:
    """Wall time of ``cmd``, started with no dirty pages left by the previous one."""
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def cloud_bench(kind: str, src_mb: int, reps: int, base: str) -> dict:
    """Commit and verify against one cloud's local endpoint, each against a plain
    baseline through the same fsspec client, interleaved repetition by repetition."""
    import hashlib

    from _clouds import endpoint

    from forge_dist.storage import CheckpointStore
    from forge_dist.storage.manifest import step_dirname

    with endpoint(kind) as cloud:
        fs = cloud.fs()
        src = os.path.join(base, f"{kind}-src")
        nbytes = make_payload(src, src_mb)
        files = sorted(os.listdir(src))
        store = CheckpointStore(cloud.url("root"), cloud.options)
        t: dict[str, list[float]] = {"commit": [], "put": [], "verify": [], "read_sha256": []}
        store.put(src, 0)  # warm-up

        def read_sha256(step: int) -> None:
            """The step's own objects, read with the client's ``cat_file`` and hashed."""
            fs.invalidate_cache()
            for name in files:
                path = f"{cloud.bucket}/root/{step_dirname(step)}/{name}"
                hashlib.sha256(fs.cat_file(path)).hexdigest()

        for rep in range(reps):
            step = rep + 1
            plain = f"{cloud.bucket}/plain-{rep}"
            # Each pair runs in both orders, alternately: what follows a 100 MB upload
            # meets an endpoint still busy with it (Azurite most).
            writes = [
                ("commit", lambda step=step: store.put(src, step)),
                ("put", lambda plain=plain: fs.put(src, plain, recursive=True)),
            ]
            reads = [
                ("verify", lambda step=step: store.verify(step)),
                ("read_sha256", lambda step=step: read_sha256(step)),
            ]
            for pair in (writes, reads):
                for name, op in pair if rep % 2 == 0 else pair[::-1]:
                    t0 = time.perf_counter()
                    op()
                    t[name].append(time.perf_counter() - t0)
            assert store.verify(step).ok
            fs.rm(plain, recursive=True)
            store.apply_retention(Retention(keep_last=1))
        shutil.rmtree(src)
        med = {k: statistics.median(v) for k, v in t.items()}

        def paired(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(t[a], t[b], strict=True))

        return {
            "faulty_network": faulty_network(cloud),
            "bytes": nbytes,
            "files": len(files),
            "reps": reps,
            "client": CLIENTS[kind],
            "seconds": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in t.items()},
            "ratios": {
                "commit_vs_put": paired("commit", "put"),
                "verify_throughput_vs_read_sha256": paired("read_sha256", "verify"),
            },
        }


def faulty_network(cloud, trials: int = 20) -> dict:
    """Saves through a proxy that resets, answers 503 SlowDown, stalls past the timeout
    or truncates 15 % of the requests (tests/faultproxy.py): each must commit a complete
    step or fail with one error; corrupt commits must be 0."""
    from faultproxy import FaultProxy

    from forge_dist.errors import ForgeDistError
    from forge_dist.storage import CheckpointStore

    proxy = FaultProxy(cloud.upstream, rate=0.15, seed=11)
    try:
        faulty = CheckpointStore(cloud.url("faulty"), cloud.options_for(proxy.url))
        committed = failed = 0
        for step in range(1, trials + 1):
            try:
                with faulty.writer(step) as w:
                    w.add_bytes("model.bin", os.urandom(300_000))
                committed += 1
            except ForgeDistError:
                failed += 1
        clean = CheckpointStore(cloud.url("faulty"), cloud.options)
        corrupt = sum(1 for s in clean.steps() if not clean.verify(s).ok)
        counts = dict(proxy.counts)
    finally:
        proxy.close()
    return {
        "trials": trials,
        "committed": committed,
        "failed": failed,
        "corrupt": corrupt,
        "requests": counts.pop("requests", 0),
        "faults": counts,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--s3-size-mb", type=int, default=100, help="payload on each cloud")
    ap.add_argument(
        "--clouds", default="s3,az,gs", help="the local cloud endpoints to measure (or none)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cloud-reps", type=int, default=11, help="repetitions on each cloud")
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="forge-bench-", dir=args.dir)
    try:
        src = os.path.join(base, "src")
        nbytes = make_payload(src, args.size_mb)
        files = sorted(os.path.join(src, f) for f in os.listdir(src))
        print(f"payload: {len(files)} files, {nbytes / 1e6:.0f} MB in {base}")
        t = {
            "store_commit": [],
            "cli_put": [],
            "cp": [],
            "cp_sync": [],
            "verify": [],
            "sha256sum": [],
        }
        openssl = shutil.which("openssl")
        if openssl:
            t["openssl_sha256"] = []
        root = os.path.join(base, "root")
        # Warm-up: page cache and first-run costs out of the figures.
        timed([FORGE, "put", src, root, "--step", "0"])
        timed(["sha256sum", *files])
        for rep in range(args.reps):
            step = rep + 1
            t["cli_put"].append(timed([FORGE, "put", src, root, "--step", str(step)]))
            t["store_commit"].append(commit_in_process(src, root, 1000 + step))
            dst = os.path.join(base, f"copy-{rep}")
            t["cp"].append(timed(["cp", "-r", src, dst]))
            dst2 = os.path.join(base, f"copy-sync-{rep}")
            t["cp_sync"].append(timed(["sh", "-c", f'cp -r "{src}" "{dst2}" && sync -f "{dst2}"']))
            t["verify"].append(timed([FORGE, "verify", root, "--step", str(step)]))
            t["sha256sum"].append(timed(["sha256sum", *files]))
            if openssl:
                t["openssl_sha256"].append(timed([openssl, "dgst", "-sha256", *files]))
            for d in (dst, dst2):
                shutil.rmtree(d)
            subprocess.run(
                [FORGE, "gc", root, "--keep-last", "1"], check=True, stdout=subprocess.DEVNULL
            )
        med = {k: statistics.median(v) for k, v in t.items()}
        results = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "bytes": nbytes,
            "files": len(files),
            "reps": args.reps,
            "seconds": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in t.items()},
            "ratios": {
                "commit_vs_cp": med["store_commit"] / med["cp"],
                "commit_vs_cp_sync": med["store_commit"] / med["cp_sync"],
                "cli_put_vs_cp_sync": med["cli_put"] / med["cp_sync"],
                "verify_throughput_vs_sha256sum": med["sha256sum"] / med["verify"],
            },
        }
        print(f"\n{'operation':<34}{'median s':>10}{'min':>8}{'max':>8}{'MB/s':>9}")
        for k, v in t.items():
            print(
                f"{k:<34}{med[k]:>10.3f}{min(v):>8.3f}{max(v):>8.3f}{nbytes / 1e6 / med[k]:>9.0f}"
            )
        r = results["ratios"]
        print(
            f"\ncommit through the store / cp -r + sync -f : {r['commit_vs_cp_sync']:.2f}x "
            "(target <= 1.3x: the same durability)"
        )
        print(f"commit through the store / cp -r (no sync) : {r['commit_vs_cp']:.2f}x")
        print(f"forge-dist put (a new process) / cp+sync   : {r['cli_put_vs_cp_sync']:.2f}x")
        print(
            f"verify throughput / sha256sum throughput   : "
            f"{r['verify_throughput_vs_sha256sum']:.2f}x (target >= 0.8x)"
        )
        if openssl:
            r["verify_throughput_vs_openssl"] = med["openssl_sha256"] / med["verify"]
            print(
                f"verify throughput / openssl dgst -sha256   : "
                f"{r['verify_throughput_vs_openssl']:.2f}x (a faster single-thread baseline)"
            )
        shutil.rmtree(root)
        shutil.rmtree(src)
        for kind in filter(None, args.clouds.split(",")):
            res = cloud_bench(kind, args.s3_size_mb, args.cloud_reps, base)
            results[kind] = res
            r = res["ratios"]
            print(
                f"\n{NAMES[kind]} on 127.0.0.1, {res['bytes'] / 1e6:.0f} MB:\n"
                f"commit through the store / plain {res['client']} put : "
                f"{r['commit_vs_put']:.2f}x (target <= 1.0x)\n"
                f"verify throughput / read + sha256 : "
                f"{r['verify_throughput_vs_read_sha256']:.2f}x"
            )
        write_result("store", results)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
