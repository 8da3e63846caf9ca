"""One file replaced atomically at any URL, with the sidecar that verifies it
(``forge_dist.storage.files``, what ChiefModelCheckpoint writes a Keras file path with):
real SIGKILLs between a save's two replacements, on local disk and S3; ``forge-dist
verify FILE`` on intact, damaged, cut-off and never-written files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_storage_crash import run_and_kill_at

from forge_dist.storage.files import SIDECAR, FileTarget, check_file

FORGE_DIST = os.path.join(os.path.dirname(sys.executable), "forge-dist")


def cli(*args, options=None):
    cmd = [FORGE_DIST, *args]
    if options:
        cmd += ["--storage-options", json.dumps(options)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_each_save_replaces_the_file_and_its_sidecar_records_the_ones_before(tmp_path):
    url = str(tmp_path / "sub" / "best.keras")  # the folder is made
    target = FileTarget(url)
    for n in range(4):
        side = target.write(lambda f, n=n: f.write(b"save %d" % n), {"epoch": n, "step": 10 * n})
    assert (tmp_path / "sub" / "best.keras").read_bytes() == b"save 3"
    assert side["epoch"] == 3 and [p["epoch"] for p in side["previous"]] == [2, 1]
    on_disk = json.loads((tmp_path / "sub" / f"best.keras{SIDECAR}").read_text())
    assert on_disk == side
    assert sorted(os.listdir(tmp_path / "sub")) == ["best.keras", f"best.keras{SIDECAR}"]
    found = check_file(url)
    assert found.report.ok and found.note is None and found.report.step == 30


def test_a_file_gets_the_permissions_a_plain_save_gives_it(tmp_path):
    old = os.umask(0o027)
    try:
        FileTarget(str(tmp_path / "m.keras")).write(lambda f: f.write(b"x"), {})
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "m.keras").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777 == 0o640


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path):
    url = str(tmp_path / "best.keras")
    target = FileTarget(url)
    target.write(lambda f: f.write(b"good"), {"epoch": 0})

    def broken(f):
        f.write(b"half")
        raise OSError("disk on fire")

    with pytest.raises(OSError):
        target.write(broken, {"epoch": 1})
    assert (tmp_path / "best.keras").read_bytes() == b"good"
    assert sorted(os.listdir(tmp_path)) == ["best.keras", f"best.keras{SIDECAR}"]
    assert check_file(url).report.ok


@pytest.mark.parametrize(
    "damage, kind",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "size_mismatch"),
        (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "hash_mismatch"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_verify_names_what_is_wrong_with_a_file(tmp_path, damage, kind):
    path = tmp_path / "m.weights.h5"
    target = FileTarget(str(path))
    target.write(lambda f: f.write(b"one" * 100), {"epoch": 0})
    target.write(lambda f: f.write(b"two" * 100), {"epoch": 1})
    damage(path)
    out = cli("verify", str(path), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 1, out.stdout
    assert [p["kind"] for p in doc["checkpoints"][0]["problems"]] == [kind]
    assert cli("verify", str(path), "--fast").returncode == (0 if kind == "hash_mismatch" else 1)


def test_a_keras_file_without_a_sidecar_is_not_a_forge_dist_checkpoint(tmp_path):
    path = tmp_path / "plain.keras"
    path.write_bytes(b"PK")
    out = cli("verify", str(path))
    assert out.returncode == 3 and "not written by forge_dist" in out.stdout


# ------------------------------------------------------------------ crashes (SIGKILL)
CRASH_POINTS = {
    # point in the second save -> (verify's exit code, the file holds save 1 or 2)
    "file.sidecar_written": (0, 1),
    "file.replaced": (0, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_sigkill_inside_a_files_save_leaves_one_whole_save_that_verifies(
    kind, point, tmp_path, request
):
    if kind == "local":
        url, options = str(tmp_path / "out" / "best.keras"), None
    else:
        s3 = request.getfixturevalue("s3")
        url = f"s3://{s3.bucket}/files-{os.urandom(4).hex()}/best.keras"
        options = {k: v for k, v in s3.options.items() if k != "skip_instance_cache"}
    FileTarget(url, options).write(lambda f: f.write(b"save 1" * 1000), {"epoch": 0})
    run_and_kill_at(url, options, point, {}, script="_crash_file.py")
    code, holds = CRASH_POINTS[point]
    out = cli("verify", url, options=options)
    assert out.returncode == code, out.stdout + out.stderr
    if holds == 1:
        assert "the newest save did not end" in out.stdout and "epoch 1" in out.stdout
    target = FileTarget(url, options)
    assert target.fs.cat_file(target.path) == (b"save %d" % holds) * 1000


@pytest.mark.slow
def test_a_sigkill_inside_a_files_first_save_leaves_nothing_committed(tmp_path):
    url = str(tmp_path / "best.keras")
    run_and_kill_at(url, None, "file.sidecar_written", {}, script="_crash_file.py")
    assert not os.path.exists(url)
    out = cli("verify", url)
    assert out.returncode == 3 and "never written" in out.stdout, out.stdout + out.stderr
