"""One report from the benchmarks' outputs (benchmarks/out/*.json).

    python benchmarks/report.py

Writes benchmarks/results.json (every figure, the machine and the date),
benchmarks/results.md (one table: each line names its baseline, measured in the same
run, and gives the ratio; absolute figures are context) and benchmarks/results.png (the
ratios as a chart). ``make bench`` runs the benchmarks, then this.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import textwrap
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _out import OUT  # noqa: E402


@dataclass
class Row:
    group: str
    measure: str
    baseline: str
    ours: str  # absolute figure, context only
    theirs: str
    ratio: float  # ours / baseline: time, or bytes (lower is better)
    target: str = ""


def _load(folder: str, name: str) -> dict:
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _ms(x: float) -> str:
    return f"{x:.2f} ms"


def _s(x: float) -> str:
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1e3:.0f} ms"


SAVERS = {
    "sync": ("`ChiefModelCheckpoint`", "≤ 1.0 (durable: fsync, hashed, committed)"),
    "async": ("`ChiefModelCheckpoint(async_save=True)`", "≤ 0.15"),
    "orbax": ("Keras' `OrbaxCheckpoint(save_on_background=True)`", "Keras' own async"),
}


def _size(save: dict) -> str:
    return f"{save['params'] / 1e6:.0f} M params ({save['file_mb']:.0f} MB)"


def save_rows(save: dict, sizes: list[dict] | None = None) -> list[Row]:
    """bench_save.py: per saver, the loop held and the training time lost in all, each
    against plain Keras ``ModelCheckpoint`` in the same fit; at the other model sizes
    (``--params-m``), the time lost, its cost per GB against the first size's, and the
    host memory the asynchronous save holds."""
    out: list[Row] = []
    if not save:
        return out
    group = "1. checkpoint, interleaved in one fit"
    base = "plain Keras `ModelCheckpoint` (same fit)"
    for i, one in enumerate([save, *(sizes or [])]):
        size = _size(one)
        held, lost = one["held"], one["lost"]
        measures = (
            ("held", "loop held at the save point", False),
            ("lost", "training time lost per save (held + the steps it slowed)", True),
        )
        for kind, (name, target) in SAVERS.items():
            if kind not in held:
                continue
            for key, what, has_target in measures[0 if i == 0 else 1 :]:
                t = one[key]  # held at the first size only: the larger ones give lost
                out.append(
                    Row(
                        group,
                        f"{what}, {size}: {name}",
                        base,
                        _s(t[kind]),
                        _s(t["keras"]),
                        t[kind] / t["keras"],
                        target if has_target else "",
                    )
                )
            if i > 0 and kind == "sync":
                per_gb = lost[kind] / one["file_mb"] * 1e3
                first = save["lost"][kind] / save["file_mb"] * 1e3
                out.append(
                    Row(
                        group,
                        f"{name}: time lost per GB saved, {size}",
                        f"the same at {save['params'] / 1e6:.0f} M params",
                        _s(per_gb),
                        _s(first),
                        per_gb / first,
                        "≈ 1 (flat as the model grows)",
                    )
                )
        if "async_host_mb" in one:
            out.append(
                Row(
                    group,
                    f"host memory the async save holds (its snapshot), {size}",
                    "the checkpoint's size",
                    f"{one['async_host_mb']:.0f} MB",
                    f"{one['file_mb']:.0f} MB",
                    one["async_host_mb"] / one["file_mb"],
                    f"peak RSS {one['peak_rss_mb'] / 1e3:.1f} GB; refused at train begin "
                    "where MemAvailable is less",
                )
            )
    return out


def tier_rows(tiers: dict) -> list[Row]:
    """Two tiers (benchmarks/bench_tiers.py): time lost per save, and resuming per tier."""
    if not tiers:
        return []
    group = "7. two tiers (node-local + S3)"
    size = f"{tiers['params'] / 1e6:.1f} M params"
    s3 = "every save straight to S3 (moto), the loop held until it commits"
    lost = tiers["lost"]
    return [
        Row(
            group,
            f"training time lost per save, {size}: {name}",
            s3,
            _s(lost[kind]),
            _s(lost["s3"]),
            tiers["lost_vs_s3"][kind],
            note,
        )
        for kind, name, note in (
            (
                "tiers",
                '`ChiefModelCheckpoint("s3://…", local_directory=…)`',
                "durable once copied",
            ),
            ("local", "`ChiefModelCheckpoint(local folder)` (nothing durable)", "the floor"),
        )
        if kind in lost
    ] + [
        Row(
            group,
            f"verified `restore_latest` from the local tier (cold cache), {size}",
            "from the durable tier (S3) alone: a requeue onto another node",
            _s(tiers["resume_s"]["local tier"]),
            _s(tiers["resume_s"]["durable tier"]),
            tiers["resume_local_vs_durable"],
        )
    ]


def host_rows(hosts: dict) -> list[Row]:
    """Across test hosts (benchmarks/bench_hosts.py)."""
    out: list[Row] = []
    for n, e in sorted((hosts.get("epoch_sync") or {}).get("by_ranks", {}).items()):
        out.append(
            Row(
                "5. across test hosts (network namespaces, in-memory bridge)",
                f"`SyncMetrics` + `SyncEarlyStopping` per epoch, one rank on each of {n} hosts",
                f"the same {n} ranks in one namespace",
                _ms(e["hosts_ms"]),
                _ms(e["local_ms"]),
                e["ratio"],
                "protocol cost only",
            )
        )
    if "bytes_per_save" in hosts:
        b = hosts["bytes_per_save"]
        out.append(
            Row(
                "5. across test hosts (network namespaces, in-memory bridge)",
                "bytes per save on the non-chief host's `/scratch`",
                "on the chief's host",
                f"{b['other']:.0f} B",
                f"{b['chief']:.0f} B",
                b["other"] / b["chief"] if b["chief"] else float("nan"),
                "0",
            )
        )
    return out


S3_RATIO = "s3_forge_vs_s3fs_get_and_load"


def resume_rows(resume: dict) -> list[Row]:
    """Resuming (benchmarks/bench_resume.py; across ranks, bench_resume_ranks.py)."""
    group = "6. resume"
    ranks = resume.get("ranks") or {}
    across = [
        Row(
            group,
            f'`restore_latest(read_on="every_rank")`, {n} ranks (`mpirun`, one host), '
            f"{ranks.get('params', 0) / 1e6:.1f} M params",
            "the chief reads and broadcasts (the default)",
            _s(t["seconds"]["every rank reads"]),
            _s(t["seconds"]["broadcast"]),
            t["ratio_every_rank_vs_broadcast"],
            "",
        )
        for n, t in (ranks.get("ranks") or {}).items()
    ]
    if "seconds" not in resume:
        return across
    s, r = resume["seconds"], resume["ratios"]

    def per_gb(res: dict, ours: str) -> float:
        return res["seconds"][ours]["median"] / res["file_mb"] * 1e3

    sized: list[Row] = []
    for other in resume.get("sizes") or []:
        size = f"{other['params'] / 1e6:.0f} M params ({other['file_mb'] / 1e3:.1f} GB)"
        for where, baseline, ours, theirs, ratio in (
            ("local", "`load_model`", "forge", "keras", "forge_vs_keras_load"),
            ("S3", "`s3fs get` + `load_model`", "s3 forge", "s3 keras", S3_RATIO),
        ):
            if ratio not in other["ratios"]:  # (a run with --no-s3 has no S3 figure)
                continue
            seconds = other["seconds"]
            sized.append(
                Row(
                    group,
                    f"build + verified `restore_latest`, {size}, {where}",
                    baseline,
                    _s(seconds[ours]["median"]),
                    _s(seconds[theirs]["median"]),
                    other["ratios"][ratio],
                    "≤ 1.0",
                )
            )
            mine, first = per_gb(other, ours), per_gb(resume, ours)
            sized.append(
                Row(
                    group,
                    f"verified restore: time per GB, {size}, {where}",
                    f"the same at {resume['params'] / 1e6:.0f} M params",
                    _s(mine),
                    _s(first),
                    mine / first,
                    "≈ 1 (flat as the model grows)",
                )
            )
    return (
        [
            Row(
                group,
                "build + verified `restore_latest`, local disk, cold cache",
                "`keras.models.load_model` (no check)",
                _s(s["forge"]["median"]),
                _s(s["keras"]["median"]),
                r["forge_vs_keras_load"],
                "≤ 1.0",
            ),
            Row(
                group,
                "build + verified `restore_latest` from S3 (moto)",
                "`s3fs get` + `load_model`",
                _s(s["s3 forge"]["median"]),
                _s(s["s3 keras"]["median"]),
                r["s3_forge_vs_s3fs_get_and_load"],
                "≤ 1.0",
            ),
        ]
        + [
            Row(
                group,
                f"cold read of the step's file (no hash), {how}",
                "one buffered 8 MiB read at a time",
                _s(t),
                _s(reads["one at a time"]),
                t / reads["one at a time"],
                "what a restore reads with" if how == "O_DIRECT, 4 in flight" else "",
            )
            for reads in [resume.get("read_seconds") or {}]
            for how, t in reads.items()
            if how != "one at a time"
        ]
        + sized
        + across
    )


def rows(
    store: dict,
    keras: dict,
    save: dict | None = None,
    hosts: dict | None = None,
    resume: dict | None = None,
    tiers: dict | None = None,
) -> list[Row]:
    out: list[Row] = save_rows(save or {}, (save or {}).get("sizes"))
    storage = [
        # group, results, (ours, baseline, baseline's name) for the commit, then for verify
        (
            "2. storage, local disk",
            store,
            ("store_commit", "cp_sync", "`cp -r` + `sync -f` (same durability)"),
            ("verify", "sha256sum", "`sha256sum` of the same files"),
        ),
    ]
    for kind, name in CLOUD_NAMES.items():
        res = store.get(kind)
        client = (res or {}).get("client", "s3fs")
        storage.append(
            (
                f"2. storage, {name} on 127.0.0.1",
                res,
                ("commit", "put", f"plain {client} `put` (no manifest)"),
                ("verify", "read_sha256", "read every object + `hashlib.sha256`"),
            )
        )
    for group, res, commit, verify in storage:
        if not res:
            continue
        t = {k: v["median"] for k, v in res["seconds"].items()}
        # A cloud's ratios are medians of each repetition's own (bench_store: pairs run
        # back to back); where the run has none, the ratio of the medians.
        paired = res.get("ratios", {})
        speed = paired.get("verify_throughput_vs_read_sha256")
        for label, (ours, base, name), ratio in (
            (
                f"commit {res['bytes'] / 1e6:.0f} MB through the store",
                commit,
                paired.get("commit_vs_put"),
            ),
            ("verify (time)", verify, 1 / speed if speed else None),
        ):
            ratio = ratio if ratio is not None else t[ours] / t[base]
            out.append(Row(group, label, name, _s(t[ours]), _s(t[base]), ratio))
    for key, launcher in (
        ("epoch_overhead", "`mpirun`, mpi"),
        ("epoch_overhead_horovod", "`horovodrun --gloo`"),
        ("epoch_overhead_mwms", "MWMS (tf_keras)"),
    ):
        if key in keras:
            e = keras[key]
            out.append(
                Row(
                    "3. sync callbacks per epoch, 2 ranks",
                    f"`SyncMetrics` + `SyncEarlyStopping`, {launcher}",
                    "plain Keras `EarlyStopping` (one rank's view)",
                    _ms(e["forge_ms"]),
                    _ms(e["plain_ms"]),
                    e["forge_ms"] / e["plain_ms"],
                    "≤ 5 ms",
                )
            )
    if "epoch_overhead_scaling" in keras:
        ms = {int(n): v for n, v in keras["epoch_overhead_scaling"]["forge_ms"].items()}
        for n in (4, 8):
            if n in ms and 2 in ms:
                out.append(
                    Row(
                        "3. sync callbacks per epoch, more ranks (`mpirun`, 2 cores)",
                        f"`SyncMetrics` + `SyncEarlyStopping` at {n} ranks",
                        "the same at 2 ranks",
                        _ms(ms[n]),
                        _ms(ms[2]),
                        ms[n] / ms[2],
                        f"≤ {n.bit_length() - 1}× (log₂ {n})",
                    )
                )
    if "bytes_per_save" in keras:
        b = keras["bytes_per_save"]
        ours, theirs = sum(b["forge"]), sum(b["plain"])
        out.append(
            Row(
                "4. bytes written per save, 2 ranks",
                "`ChiefModelCheckpoint`",
                "plain Keras 3 `ModelCheckpoint` (every rank writes)",
                f"{ours / 1e6:.2f} MB",
                f"{theirs / 1e6:.2f} MB",
                ours / theirs,
                "rank 1 writes nothing",
            )
        )
    if "tensorboard_epoch" in keras:
        t = keras["tensorboard_epoch"]
        out.append(
            Row(
                "6. TensorBoard per epoch, 2 ranks",
                "`ChiefTensorBoard` (synced scalars; the chief writes and flushes)",
                "plain Keras `TensorBoard` (every rank writes its own)",
                _ms(t["forge_ms"]),
                _ms(t["plain_ms"]),
                t["forge_ms"] / t["plain_ms"],
            )
        )
    if "optimizer_vs_horovod" in keras:
        o = keras["optimizer_vs_horovod"]
        ours = sorted(o["forge_ms"])[len(o["forge_ms"]) // 2]
        theirs = sorted(o["horovod_ms"])[len(o["horovod_ms"]) // 2]
        out.append(
            Row(
                "5. step time, tf_keras, `horovodrun` 2 ranks",
                "`forge_dist.keras.DistributedOptimizer`",
                "Horovod's `DistributedOptimizer`",
                _ms(ours),
                _ms(theirs),
                o["ratio"],
                "≤ 1.1",
            )
        )
    out.extend(host_rows(hosts or {}))
    out.extend(resume_rows(resume or {}))
    out.extend(tier_rows(tiers or {}))
    return out


#: What the rows of a group include, said under the table when the group is there.
NOTES = (
    (
        "1. checkpoint",
        (
            "**Checkpoint rows (1.)** come from one `fit` of the model at one TensorFlow "
            "thread in which the savers take turns: blocks of two epochs that begin with a "
            "save alternate with clean blocks (`benchmarks/bench_save.py`). *Held* is how "
            "long the callback held the loop at the save point; *lost* is a save block's "
            "time minus the mean of the clean blocks on either side: the held time plus "
            "every step the save slowed in the two epochs after it (a background save still "
            "running at its "
            "block's end is waited for, and that counts). Between blocks, untimed, all "
            "dirty pages are written out, so plain Keras' unsynced file is not written back "
            "during a later block (nobody is charged for it). Medians over the rounds after "
            "the first. Plain Keras writes each save into memory taken afresh (h5py's "
            "in-memory file, then the page cache), which this VM hands back to its host "
            "between saves (virtio-balloon free page reporting), so its time per save swings "
            "2–3× within one fit; ours copies into host buffers allocated once and "
            "writes around the page cache (`O_DIRECT`), so its time is the device's."
        ),
    ),
    (
        "6. resume",
        (
            "**Resume rows (6.)** are from nothing to a model ready to train, 50 M "
            "parameters with Adam (605 MB), `benchmarks/bench_resume.py`: ours builds and "
            "compiles the model, then `restore_latest` hashes every byte against the "
            "manifest; the baseline loads the same model with no check. Local files are "
            "written out and dropped from the page cache before each load; moto serves S3 "
            "from memory. The kinds alternate their order round by round; medians after "
            "the first round. The read rows time a cold read of the step's file alone (no "
            "hash, no model) three ways, the way the restore reads it chosen from them. The "
            "rank rows (`benchmarks/bench_resume_ranks.py`) restore a 151 MB step on every "
            "rank of one `mpirun`, from a barrier to the last rank done, the two ways "
            "alternating round by round; the ranks share one host's disk and page cache."
        ),
    ),
    (
        "7. two tiers",
        (
            "**Two-tier rows (7.)** come from `benchmarks/bench_tiers.py`: whole `fit`s of a "
            "12.6 M-parameter model (151 MB with Adam) at one TensorFlow thread, a save at "
            "each epoch end, the kinds (no checkpoint, straight to S3, local only, two "
            "tiers) taking turns round by round. *Lost per save* is a kind's fit minus the "
            "clean fit, over the saves: the hold, the background copy competing with "
            "training (moto's server a third process on the 2 cores), and the wait at train "
            "end for the last copy to be durable. Resume: a verified `restore_latest` into "
            "the built model, from the local tier (page cache dropped) and from S3 alone."
        ),
    ),
    (
        "3. sync",
        (
            "**Sync rows (3.)** time one epoch end on the chief, every epoch started "
            "together after a barrier; the synced callbacks and plain Keras take turns in "
            "blocks of 25 epochs (medians after the first two blocks: plain Keras runs a "
            "TensorFlow op every epoch, whose aftermath landed in the next synced epoch "
            "when they alternated epoch by epoch). Rank counts are run in three rounds of "
            "2, 4 and 8 ranks; each figure is the median of its three jobs."
        ),
    ),
)


#: The clouds bench_store measures, by protocol, as the report names them.
CLOUD_NAMES = {"s3": "S3", "az": "Azure Blob (Azurite)", "gs": "GCS (fake-gcs-server)"}


def markdown(
    table: list[Row], machine: str, date: str, faults: dict[str, dict] | None = None
) -> str:
    lines = [
        "# forge_dist benchmark report",
        "",
        f"Taken {date} on {machine}, by `make bench`. Each line's baseline was measured in "
        "the same run; the ratio is ours / baseline (time, or bytes): below 1 is better. "
        "Absolute figures are medians, for context.",
        "",
        "| | measurement | baseline | ours | baseline | ratio | target / note |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in table:
        lines.append(
            f"| {r.group} | {r.measure} | {r.baseline} | {r.ours} | {r.theirs} | "
            f"**{r.ratio:.3g}×** | {r.target} |"
        )
    for prefix, note in NOTES:
        if any(r.group.startswith(prefix) for r in table):
            lines += ["", note]
    lines += ["", "![ratios](results.png)", ""]
    for kind, f in (faults or {}).items():
        injected = sum(f["faults"].values())
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(f["faults"].items()))
        lines += [
            f"**A faulty network, {CLOUD_NAMES[kind]}** (a proxy in front of its endpoint: "
            "connection resets, `503 SlowDown`, stalls past the timeout, truncated "
            f"responses, 15 % of requests): {f['trials']} saves, {f['requests']} requests, "
            f"{injected} faults injected ({kinds}); {f['committed']} committed, "
            f"{f['failed']} failed with one clear error, **{f['corrupt']} corrupt commits** "
            "(must be 0).",
            "",
        ]
    return "\n".join(lines)


def chart(table: list[Row], path: str, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: Row) -> str:
        text = f"{r.group}: {r.measure} vs {r.baseline}"
        text = re.sub(r" \([^)]*\)", "", text).replace("`", "")
        return "\n".join(textwrap.wrap(text, 58))

    labels = [label(r) for r in table]
    ratios = [r.ratio for r in table]
    fig, ax = plt.subplots(figsize=(12, 0.8 * len(table) + 1.5))
    colors = ["#2a7" if x <= 1 else "#c64" for x in ratios]
    y = range(len(table))[::-1]
    ax.barh(list(y), ratios, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(list(y), labels, fontsize=7)
    for yi, x in zip(y, ratios, strict=True):
        ax.text(x, yi, f" {x:.3g}×", va="center", fontsize=8)
    ax.set_xlabel("ours / baseline, same run (time or bytes; log scale; < 1 is better)")
    ax.set_title(f"forge_dist against its baselines ({machine})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-dir", default=OUT, help="the benchmarks' JSON outputs")
    ap.add_argument("--out-dir", default=HERE, help="where results.{json,md,png} go")
    args = ap.parse_args(argv)
    store, keras = _load(args.in_dir, "store"), _load(args.in_dir, "keras")
    save, hosts = _load(args.in_dir, "save"), _load(args.in_dir, "hosts")
    resume = _load(args.in_dir, "resume")
    if _load(args.in_dir, "resume_ranks"):
        resume = {**resume, "ranks": _load(args.in_dir, "resume_ranks")}
    sizes = [_load(args.in_dir, f"resume-{m}m") for m in (200, 400)]
    if resume and any(sizes):
        resume = {**resume, "sizes": [x for x in sizes if x]}
    sizes = [_load(args.in_dir, f"save-{m}m") for m in (200, 400)]
    if save and any(sizes):
        save = {**save, "sizes": [x for x in sizes if x]}
    tiers = _load(args.in_dir, "tiers")
    if not any((store, keras, save, hosts, resume, tiers)):
        print(f"no benchmark output in {args.in_dir}: run `make bench`", file=sys.stderr)
        return 2
    machine = (
        keras.get("machine") or store.get("machine") or save.get("machine") or platform.machine()
    )
    date = datetime.date.today().isoformat()
    table = rows(store, keras, save, hosts, resume, tiers)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(
            {
                "date": date,
                "machine": machine,
                "table": [asdict(r) for r in table],
                "store": store,
                "keras": keras,
                "save": save,
                "hosts": hosts,
                "resume": resume,
                "tiers": tiers,
            },
            f,
            indent=2,
        )
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        faults = {
            kind: store[kind]["faulty_network"]
            for kind in CLOUD_NAMES
            if (store.get(kind) or {}).get("faulty_network")
        }
        f.write(markdown(table, machine, date, faults))
    chart(table, os.path.join(args.out_dir, "results.png"), machine)
    for r in table:
        print(f"{r.ratio:7.2f}x  {r.measure}  vs {r.baseline}")
    print(f"wrote results.json, results.md, results.png in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
