"""benchmarks/report.py turns the benchmarks' outputs into one table and one chart."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytest.importorskip("matplotlib", reason="matplotlib is in the [bench] extra")
import report  # noqa: E402


def med(x):
    return {"median": x, "min": x, "max": x}


SAVE = {
    "params": 50_000_000,
    "file_mb": 605.0,
    "held": {"keras": 2.0, "sync": 1.8, "async": 0.1},
    "lost": {"keras": 2.0, "sync": 1.9, "async": 0.16},
}
KERAS = {
    "machine": "test box",
    "epoch_overhead": {"forge_ms": 0.75, "plain_ms": 0.25},
    "bytes_per_save": {"plain": [100.0, 100.0], "forge": [101.0, 0.0], "ratio": 0.505},
    "optimizer_vs_horovod": {"forge_ms": [5.4, 5.5, 5.6], "horovod_ms": [5, 5, 5], "ratio": 1.1},
}
STORE = {
    "bytes": 500e6,
    "seconds": {
        "store_commit": med(2.0),
        "cp_sync": med(2.5),
        "verify": med(0.5),
        "sha256sum": med(1.5),
    },
    "s3": {
        "bytes": 100e6,
        "seconds": {
            "commit": med(3.0),
            "put": med(2.0),
            "verify": med(1.0),
            "read_sha256": med(2.0),
        },
    },
}


def test_report_names_every_baseline_and_ratio(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "keras.json").write_text(json.dumps(KERAS))
    (src / "store.json").write_text(json.dumps(STORE))
    (src / "save.json").write_text(json.dumps(SAVE))
    assert report.main(["--in-dir", str(src), "--out-dir", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    ratios = [r["ratio"] for r in table]
    assert len(table) == 11  # (no OrbaxCheckpoint row: it was not measured)
    assert pytest.approx(0.05) in ratios  # async held / plain Keras
    assert pytest.approx(0.08) in ratios  # async time lost / plain Keras
    assert pytest.approx(0.95) in ratios  # sync time lost / plain Keras
    assert pytest.approx(0.8) in ratios  # commit / cp + sync
    assert pytest.approx(1 / 3) in ratios  # verify time / sha256sum
    assert pytest.approx(1.5) in ratios  # S3 commit / put
    assert pytest.approx(3.0) in ratios  # sync callbacks / plain EarlyStopping
    assert pytest.approx(0.505) in ratios  # bytes written
    assert all(r["baseline"] for r in table)
    md = (out / "results.md").read_text()
    assert "test box" in md and "**0.05×**" in md and "results.png" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_outputs_says_how_to_make_them(tmp_path, capsys):
    assert report.main(["--in-dir", str(tmp_path), "--out-dir", str(tmp_path)]) == 2
    assert "make bench" in capsys.readouterr().err


def test_report_has_the_rows_across_hosts(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    hosts = {
        "epoch_sync": {
            "by_ranks": {
                "2": {"hosts_ms": 3.0, "local_ms": 2.0, "ratio": 1.5},
                "4": {"hosts_ms": 8.0, "local_ms": 4.0, "ratio": 2.0},
            }
        },
        "bytes_per_save": {"chief": 90_000.0, "other": 0.0},
    }
    (src / "hosts.json").write_text(json.dumps(hosts))
    assert report.main(["--in-dir", str(src), "--out-dir", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert [(r["measure"].split(",")[-1], r["ratio"]) for r in table] == [
        (" one rank on each of 2 hosts", 1.5),
        (" one rank on each of 4 hosts", 2.0),
        ("bytes per save on the non-chief host's `/scratch`", 0.0),
    ]
    assert "the same 4 ranks in one namespace" in (out / "results.md").read_text()


def test_report_has_the_resume_rows(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    seconds = {k: {"median": v} for k, v in (("keras", 2.0), ("forge", 1.5), ("s3 keras", 8.0))}
    resume = {
        "seconds": {**seconds, "s3 forge": {"median": 6.0}},
        "ratios": {"forge_vs_keras_load": 0.75, "s3_forge_vs_s3fs_get_and_load": 0.75},
        "read_seconds": {"one at a time": 0.8, "4 in flight": 0.4, "O_DIRECT, 4 in flight": 0.5},
    }
    (src / "resume.json").write_text(json.dumps(resume))
    assert report.main(["--in-dir", str(src), "--out-dir", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert [(r["baseline"], r["ours"], r["theirs"], r["ratio"]) for r in table] == [
        ("`keras.models.load_model` (no check)", "1.50 s", "2.00 s", 0.75),
        ("`s3fs get` + `load_model`", "6.00 s", "8.00 s", 0.75),
        ("one buffered 8 MiB read at a time", "0.40 s", "0.80 s", 0.5),
        ("one buffered 8 MiB read at a time", "0.50 s", "0.80 s", 0.625),
    ]
    assert "**Resume rows (6.)**" in (out / "results.md").read_text()


def test_report_has_a_row_per_rank_count_of_the_resume_across_ranks(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    ranks = {
        "params": 12.6e6,
        "ranks": {
            str(n): {
                "seconds": {"broadcast": 1.0 * n, "every rank reads": 0.75 * n},
                "ratio_every_rank_vs_broadcast": 0.75,
            }
            for n in (2, 8)
        },
    }
    (src / "resume_ranks.json").write_text(json.dumps(ranks))
    assert report.main(["--in-dir", str(src), "--out-dir", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert [(r["ours"], r["theirs"], r["ratio"]) for r in table] == [
        ("1.50 s", "2.00 s", 0.75),
        ("6.00 s", "8.00 s", 0.75),
    ]
    assert "8 ranks" in table[1]["measure"] and "12.6 M params" in table[1]["measure"]


def test_report_has_the_resume_rows_of_larger_models(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()

    def resume(params, ratio):
        kinds = ("keras", "forge", "s3 keras", "s3 forge")
        return {
            "params": params,
            "file_mb": params * 12 / 1e6,
            "seconds": {k: {"median": 1.0 + i} for i, k in enumerate(kinds)},
            "ratios": {"forge_vs_keras_load": ratio, "s3_forge_vs_s3fs_get_and_load": ratio},
        }

    (src / "resume.json").write_text(json.dumps(resume(50e6, 0.5)))
    big = resume(200e6, 0.7)
    big["seconds"]["forge"]["median"] = 10.0  # 4.17 s/GB against 2.0 s / 0.6 GB at 50 M
    (src / "resume-200m.json").write_text(json.dumps(big))
    assert report.main(["--in-dir", str(src), "--out-dir", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert [(r["measure"], r["ratio"]) for r in table[2:]] == [
        ("build + verified `restore_latest`, 200 M params (2.4 GB), local", 0.7),
        (
            "verified restore: time per GB, 200 M params (2.4 GB), local",
            pytest.approx((10.0 / 2.4) / (2.0 / 0.6)),
        ),
        ("build + verified `restore_latest`, 200 M params (2.4 GB), S3", 0.7),
        (
            "verified restore: time per GB, 200 M params (2.4 GB), S3",
            pytest.approx((4.0 / 2.4) / (4.0 / 0.6)),
        ),
    ]


def test_report_has_the_save_rows_of_larger_models_and_the_async_host_memory(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    memory = {"async_host_mb": 600.0, "state_mb": 600.0, "peak_rss_mb": 3000.0}
    (src / "save.json").write_text(json.dumps({**SAVE, **memory}))
    big = {
        "params": 200_000_000,
        "file_mb": 2400.0,
        "held": {"keras": 8.0, "sync": 7.0, "async": 0.4},
        "lost": {"keras": 8.0, "sync": 9.6, "async": 0.8},
        "async_host_mb": 2400.0,
        "state_mb": 2400.0,
        "peak_rss_mb": 12000.0,
    }
    (src / "save-200m.json").write_text(json.dumps(big))
    assert report.main(["--in-dir", str(src), "--out-dir", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    big_rows = [(r["measure"], r["ratio"]) for r in table if "200 M" in r["measure"]]
    assert big_rows == [
        (
            "training time lost per save (held + the steps it slowed), 200 M params (2400 MB): "
            "`ChiefModelCheckpoint`",
            pytest.approx(1.2),
        ),
        (
            "`ChiefModelCheckpoint`: time lost per GB saved, 200 M params (2400 MB)",
            # 9.6 s / 2.4 GB against 1.9 s / 0.605 GB
            pytest.approx((9.6 / 2.4) / (1.9 / 0.605)),
        ),
        (
            "training time lost per save (held + the steps it slowed), 200 M params (2400 MB): "
            "`ChiefModelCheckpoint(async_save=True)`",
            pytest.approx(0.1),
        ),
        ("host memory the async save holds (its snapshot), 200 M params (2400 MB)", 1.0),
    ]
    memory_rows = [r for r in table if r["measure"].startswith("host memory")]
    assert [r["ours"] for r in memory_rows] == ["600 MB", "2400 MB"]
    assert "peak RSS 12.0 GB" in memory_rows[1]["target"]


def test_report_has_the_two_tier_rows(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    tiers = {
        "params": 12_600_000,
        "lost": {"s3": 2.0, "local": 0.2, "tiers": 1.0},
        "lost_vs_s3": {"s3": 1.0, "local": 0.1, "tiers": 0.5},
        "resume_s": {"local tier": 0.25, "durable tier": 0.6},
        "resume_local_vs_durable": 0.25 / 0.6,
    }
    (src / "tiers.json").write_text(json.dumps(tiers))
    assert report.main(["--in-dir", str(src), "--out-dir", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert [(r["ours"], r["theirs"], r["ratio"]) for r in table] == [
        ("1.00 s", "2.00 s", 0.5),
        ("0.20 s", "2.00 s", 0.1),
        ("0.25 s", "0.60 s", pytest.approx(0.4167, abs=1e-4)),
    ]
    assert "local_directory" in table[0]["measure"] and "S3" in table[0]["baseline"]
    assert "durable tier" in table[2]["baseline"]
    assert "**Two-tier rows (7.)**" in (out / "results.md").read_text()


def test_report_has_commit_and_verify_rows_and_the_faulty_network_of_each_cloud(tmp_path):
    def cloud(commit, put, verify, read, client, faults=None, ratios=None):
        secs = {"commit": med(commit), "put": med(put), "verify": med(verify)}
        secs["read_sha256"] = med(read)
        out = {"bytes": 100e6, "client": client, "seconds": secs, "faulty_network": faults}
        return {**out, "ratios": ratios} if ratios else out

    faults = {"trials": 20, "requests": 90, "faults": {"reset": 5, "stall": 2}}
    faults.update(committed=18, failed=2, corrupt=0)
    paired = {"commit_vs_put": 0.9, "verify_throughput_vs_read_sha256": 1.6}
    store = {
        **STORE,
        "az": cloud(4.0, 5.0, 1.0, 2.5, "adlfs"),
        "gs": cloud(1.0, 2.0, 3.0, 2.0, "gcsfs", faults),
        # Each repetition's own ratio, as bench_store writes them: these are the figures.
        "s3": cloud(3.0, 2.0, 1.0, 2.0, "s3fs", ratios=paired),
    }
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "keras.json").write_text(json.dumps(KERAS))
    (src / "store.json").write_text(json.dumps(store))
    assert report.main(["--in-dir", str(src), "--out-dir", str(out)]) == 0
    rows = {
        (r["group"], r["measure"].split(" ")[0]): r
        for r in json.loads((out / "results.json").read_text())["table"]
    }
    az, gs = (
        "2. storage, Azure Blob (Azurite) on 127.0.0.1",
        "2. storage, GCS (fake-gcs-server) on 127.0.0.1",
    )
    assert rows[(az, "commit")]["ratio"] == pytest.approx(0.8)  # commit / plain put
    assert rows[(az, "commit")]["baseline"] == "plain adlfs `put` (no manifest)"
    assert rows[(az, "verify")]["ratio"] == pytest.approx(0.4)  # verify / read + sha256
    assert rows[(gs, "commit")]["ratio"] == pytest.approx(0.5)
    assert rows[(gs, "verify")]["ratio"] == pytest.approx(1.5)
    s3 = "2. storage, S3 on 127.0.0.1"
    assert rows[(s3, "commit")]["ratio"] == pytest.approx(0.9)  # not 3.0 / 2.0
    assert rows[(s3, "verify")]["ratio"] == pytest.approx(1 / 1.6)  # time, not throughput
    md = (out / "results.md").read_text()
    assert "A faulty network, GCS (fake-gcs-server)" in md and "**0 corrupt commits**" in md
    assert "A faulty network, Azure" not in md  # not measured there
