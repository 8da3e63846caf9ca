"""The checkpoint lifecycle on the command line: inspect, ls --monitor, export, cp, rm,
and gc's direction and typos, on local disk and a real S3 endpoint (separate processes)
and memory:// (in process); one clear line and the contract's exit codes on bad input."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from clihelp import one_clear_line, opts, run
from conftest import cloud_target

from forge_dist.cli import main as cli_main
from forge_dist.storage import MANIFEST_NAME, CheckpointStore


def keras_root(target, steps=(1, 2, 3)):
    """Steps holding a model.keras, with epochs, a run and a recorded mode, as the
    Keras callbacks write them."""
    store = target.store()
    for s in steps:
        state = {
            "epoch": s - 1,
            "epoch_done": True,
            "batch": None,
            "callbacks": {"checkpoint": {"best": None, "mode": "max"}},
        }
        run_ = {"id": "abc123abc123", "name": "exp", "model_fingerprint": "f" * 16}
        metrics = {"val_score": [0.2, 0.9, 0.5][s - 1], "val_acc": 0.1 * s}
        with store.writer(s, metrics=metrics, state=state, run=run_) as w:
            w.add_bytes("model.keras", b"K" * 100 * s)
    return store


def test_inspect_shows_position_run_writer_and_state(cli_target):
    keras_root(cli_target)
    out = run("inspect", cli_target.url, *opts(cli_target), env=cli_target.env)
    assert out.returncode == 0, out.stderr
    assert "step-00000003" in out.stdout and "epoch 3 end" in out.stdout
    assert "abc123abc123 (exp)" in out.stdout and "checkpoint" in out.stdout
    js = json.loads(
        run(
            "inspect",
            cli_target.url,
            "--step",
            "2",
            "--json",
            *opts(cli_target),
            env=cli_target.env,
        ).stdout
    )
    assert js["step"] == 2 and js["manifest"]["run"]["id"] == "abc123abc123"
    assert js["manifest"]["state"]["epoch"] == 1
    missing = run("inspect", cli_target.url, "--step", "9", *opts(cli_target), env=cli_target.env)
    assert missing.returncode == 3 and "no committed step-00000009" in one_clear_line(missing)


def test_a_mid_epoch_position_shows_its_global_sample_offset():
    from forge_dist.cli.commands.inspect import position

    state = {"epoch": 1, "epoch_done": False, "batch": 3}
    assert position(state) == "epoch 2, batch 4"
    assert position({**state, "samples": 64}) == "epoch 2, batch 4 (sample 64 of the epoch)"


def test_ls_marks_the_best_step_and_shows_epoch_and_run(cli_target):
    keras_root(cli_target)
    out = run(
        "ls",
        cli_target.url,
        "--monitor",
        "val_score",
        "--json",
        *opts(cli_target),
        env=cli_target.env,
    )
    js = json.loads(out.stdout)
    assert js["best_step"] == 2  # val_score: max (the checkpoints recorded it)
    assert [c["best"] for c in js["checkpoints"]] == [False, True, False]
    # epochs counted from 1, as the table and Keras count them
    assert js["checkpoints"][0]["epoch"] == 1 and js["checkpoints"][0]["run"]["name"] == "exp"
    folder = run(
        "ls", f"{cli_target.url}/step-00000002", "--json", *opts(cli_target), env=cli_target.env
    )
    assert folder.returncode == 0
    assert [c["step"] for c in json.loads(folder.stdout)["checkpoints"]] == [2]


def test_ls_in_a_pipe_is_one_line_a_step_and_json_has_every_metric(tmp_path):
    store = CheckpointStore(str(tmp_path / "r"))
    names = {f"val_metric_number_{i}": i / 7 for i in range(6)}
    for step in (1, 2):
        with store.writer(step, metrics={**names, "loss": 0.5}) as w:
            w.add_bytes("a", b"a")
    monitor = ["--monitor", "val_metric_number_5", "--mode", "max"]
    out = run("ls", str(tmp_path / "r"), *monitor, env={"COLUMNS": "80"})
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert [ln.split()[0] for ln in lines[:2]] == ["1", "2"], out.stdout
    assert "val_metric_number_5=0.714286" in lines[0] and "(+4)" in lines[0]  # monitor first
    assert lines[1].endswith("committed, best") and lines[2].startswith("sizes checked")
    js = json.loads(run("ls", str(tmp_path / "r"), "--json").stdout)
    assert len(js["checkpoints"][0]["metrics"]) == 7


def test_ls_checks_sizes_and_says_contents_are_not_hashed(tmp_path):
    store = CheckpointStore(str(tmp_path / "r"))
    for step in (1, 2, 3):
        with store.writer(step) as w:
            w.add_bytes("model.keras", b"K" * 100)
    (tmp_path / "r" / "step-00000001" / "model.keras").write_bytes(b"")  # emptied
    (tmp_path / "r" / "step-00000002" / "model.keras").write_bytes(b"X" * 100)  # flipped
    out = run("ls", str(tmp_path / "r"))
    lines = out.stdout.splitlines()
    assert "damaged: model.keras" in lines[0] and lines[1].endswith("committed")
    assert "contents are hashed by forge-dist verify --all" in out.stdout
    js = json.loads(run("ls", str(tmp_path / "r"), "--json").stdout)
    assert [c["ok"] for c in js["checkpoints"]] == [False, True, True]


def test_verify_names_a_step_folder_whose_manifest_is_gone(tmp_path):
    store = CheckpointStore(str(tmp_path / "r"))
    for step in (1, 2):
        with store.writer(step) as w:
            w.add_bytes("model.keras", b"K" * 100)
    (tmp_path / "r" / "step-00000002" / MANIFEST_NAME).unlink()
    out = run("verify", str(tmp_path / "r"))
    assert out.returncode == 1, out.stdout
    assert "step-00000002: a step folder without its manifest" in out.stdout
    doc = json.loads(run("verify", str(tmp_path / "r"), "--json").stdout)
    assert [s["kind"] for s in doc["staging"]] == ["orphan"] and not doc["ok"]
    gc = run("gc", str(tmp_path / "r"), "--keep-last", "1", "--grace", "0")
    assert gc.returncode == 0 and (tmp_path / "r" / "step-00000002").is_dir()  # kept


def test_export_writes_the_model_verified(cli_target, tmp_path):
    keras_root(cli_target)
    dest = tmp_path / "best.keras"
    out = run(
        "export", cli_target.url, str(dest), "--step", "2", *opts(cli_target), env=cli_target.env
    )
    assert out.returncode == 0, out.stderr
    assert dest.read_bytes() == b"K" * 200
    again = run("export", cli_target.url, str(dest), *opts(cli_target), env=cli_target.env)
    assert again.returncode == 2 and "--force" in one_clear_line(again)
    wrong = run(
        "export", cli_target.url, str(tmp_path / "x.h5"), *opts(cli_target), env=cli_target.env
    )
    assert wrong.returncode == 2 and ".keras or .weights.h5" in one_clear_line(wrong)


def test_export_of_a_damaged_step_fails_with_1_and_writes_nothing(tmp_path):
    from conftest import Target

    target = Target("local", str(tmp_path / "r"), None, {})
    keras_root(target)
    (tmp_path / "r" / "step-00000003" / "model.keras").write_bytes(b"X" * 300)  # same size
    out = run("export", target.url, str(tmp_path / "m.keras"))
    assert out.returncode == 1 and "sha256 mismatch" in one_clear_line(out)
    assert not (tmp_path / "m.keras").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no scratch left behind


def test_cp_copies_verified_into_another_kind_of_store(cli_target, tmp_path, request):
    keras_root(cli_target)
    # Into the next kind of storage (local -> S3 -> Azure -> GCS -> local), committed by
    # that store's protocol.
    kinds = ["local", "s3", "az", "gs"]
    other = kinds[(kinds.index(cli_target.kind) + 1) % len(kinds)]
    if other == "local":
        dst, dst_env, dst_options = str(tmp_path / "copy"), {}, None
    else:
        t = cloud_target(request, other, "cp-")
        dst, dst_env, dst_options = t.url, t.env, t.options
    env = {**cli_target.env, **dst_env}
    dst_opts = ["--dst-storage-options", json.dumps(dst_options)] if dst_options else []
    out = run("cp", cli_target.url, dst, "--all", *opts(cli_target), *dst_opts, env=env)
    assert out.returncode == 0, out.stderr
    copied = CheckpointStore(dst, dst_options)
    assert copied.steps() == [1, 2, 3]
    assert all(copied.verify(s).ok for s in (1, 2, 3))
    assert copied.get(2).manifest.run["id"] == "abc123abc123"
    assert copied.get(2).metrics == cli_target.store().get(2).metrics
    exists = run("cp", cli_target.url, dst, "--step", "2", *opts(cli_target), env=env)
    assert exists.returncode == 2 and "pass --replace" in one_clear_line(exists)


def test_cp_of_a_damaged_step_commits_nothing(tmp_path):
    src = tmp_path / "src"
    store = CheckpointStore(str(src))
    with store.writer(1) as w:
        w.add_bytes("model.keras", b"ok" * 50)
    (src / "step-00000001" / "model.keras").write_bytes(b"no" * 50)
    out = run("cp", str(src), str(tmp_path / "dst"))
    assert out.returncode == 1 and "does not match its manifest" in one_clear_line(out)
    assert CheckpointStore(str(tmp_path / "dst")).list() == []


def test_cp_and_rm_in_memory(capsys):
    src, dst = f"memory://cli-{os.urandom(3).hex()}/a", f"memory://cli-{os.urandom(3).hex()}/b"
    store = CheckpointStore(src)
    for s in (1, 2):
        with store.writer(s) as w:
            w.add_bytes("f", b"x" * s)
    assert cli_main.main(["cp", src, dst, "--step", "1"]) == 0
    assert CheckpointStore(dst).steps() == [1]
    assert cli_main.main(["rm", src, "--step", "2"]) == 0
    assert CheckpointStore(src).steps() == [1]
    assert cli_main.main(["rm", src, "--step", "2"]) == 3
    capsys.readouterr()


def test_put_a_keras_file_then_export_and_inspect_it(tmp_path):
    src = tmp_path / "s3best.keras"
    src.write_bytes(b"PK" * 64)
    root = str(tmp_path / "r")
    out = run("put", str(src), root, "--step", "7", "--meta", "note=from the cluster")
    assert out.returncode == 0 and "(as model.keras)" in out.stdout, out.stdout + out.stderr
    assert [e.path for e in CheckpointStore(root).get(7).manifest.files] == ["model.keras"]
    dest = tmp_path / "not" / "yet" / "there.keras"  # a folder that does not exist yet
    exported = run("export", root, str(dest))
    assert exported.returncode == 0, exported.stderr
    assert dest.read_bytes() == src.read_bytes() and f"to {dest} (" in exported.stdout
    shown = run("inspect", root)
    assert "meta        note=from the cluster" in shown.stdout


def test_cp_keeps_when_a_checkpoint_was_taken(tmp_path):
    store = CheckpointStore(str(tmp_path / "a"))
    with store.writer(1) as w:
        w.add_bytes("f", b"x")
    assert run("cp", str(tmp_path / "a"), str(tmp_path / "b")).returncode == 0
    copied = CheckpointStore(str(tmp_path / "b")).get(1).manifest
    assert copied.created == store.get(1).manifest.created


def test_rm_takes_a_step_folder(tmp_path):
    store = CheckpointStore(str(tmp_path / "r"))
    for s in (1, 2):
        with store.writer(s) as w:
            w.add_bytes("f", b"x")
    out = run("rm", str(tmp_path / "r" / "step-00000001"))
    assert out.returncode == 0 and store.steps() == [2], out.stderr
    neither = run("rm", str(tmp_path / "r"))
    assert neither.returncode == 2 and "pass --step N" in one_clear_line(neither)


def test_rm_and_gc_on_each_store(cli_target):
    """``rm`` of a step folder URL and ``gc --keep-best`` on local disk and on each
    cloud's endpoint, the credentials from the environment."""
    store = keras_root(cli_target)
    out = run("rm", f"{cli_target.url}/step-00000001", *opts(cli_target), env=cli_target.env)
    assert out.returncode == 0 and store.steps() == [2, 3], out.stderr
    out = run(
        "gc",
        cli_target.url,
        *("--keep-best", "1", "--monitor", "val_acc", "--grace", "0"),
        *opts(cli_target),
        env=cli_target.env,
    )
    assert out.returncode == 0, out.stderr
    assert store.steps() == [3], out.stdout  # the best val_acc, and the newest
    assert store.verify(3).ok


def test_gc_keeps_the_best_alone_warns_on_a_reversed_mode_and_a_dry_run_would_keep(tmp_path):
    from conftest import Target

    keras_root(Target("local", str(tmp_path / "r"), None, {}))
    dry = run("gc", str(tmp_path / "r"), "--keep-best", "1", "--monitor", "val_acc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete step 1" in dry.stdout and "would keep 1 committed" in dry.stdout
    assert "kept" not in dry.stdout
    assert CheckpointStore(str(tmp_path / "r")).steps() == [1, 2, 3]
    reversed_ = run(
        "gc", str(tmp_path / "r"), "--keep-best", "1", "--monitor", "val_acc", "--mode", "min"
    )
    assert "'val_acc' is normally maximised" in reversed_.stderr
    none = run("gc", str(tmp_path / "r"))
    assert none.returncode == 2 and "say what to keep" in one_clear_line(none)


def test_rm_takes_the_marker_first(tmp_path):
    store = CheckpointStore(str(tmp_path / "r"))
    for s in (1, 2):
        with store.writer(s) as w:
            w.add_bytes("f", b"x")
    out = run("rm", str(tmp_path / "r"), "--step", "1", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["step"] == 1
    assert store.steps() == [2] and sorted(os.listdir(tmp_path / "r")) == ["step-00000002"]


def test_gc_direction_follows_keras_rules_or_the_recorded_mode(tmp_path):
    from conftest import Target

    keras_root(Target("local", str(tmp_path / "r"), None, {}))
    # val_acc: Keras' name rule (max) keeps step 3 (0.3), not step 1 (0.1).
    out = run(
        "gc",
        str(tmp_path / "r"),
        "--keep-last",
        "1",
        "--keep-best",
        "1",
        "--monitor",
        "val_acc",
        "--json",
    )
    assert json.loads(out.stdout)["deleted_steps"] == [1, 2]
    keras_root(Target("local", str(tmp_path / "s"), None, {}))
    # val_score: no name rule; the manifests recorded max: the 0.9 of step 2 is kept.
    out = run(
        "gc",
        str(tmp_path / "s"),
        "--keep-last",
        "1",
        "--keep-best",
        "1",
        "--monitor",
        "val_score",
        "--json",
    )
    assert json.loads(out.stdout)["kept_steps"] == [2, 3]


def test_gc_refuses_a_monitor_no_manifest_carries_and_a_zero_count(tmp_path):
    from conftest import Target

    keras_root(Target("local", str(tmp_path / "r"), None, {}))
    typo = run(
        "gc", str(tmp_path / "r"), "--keep-last", "1", "--keep-best", "1", "--monitor", "val_scor"
    )
    line = one_clear_line(typo)
    assert typo.returncode == 2 and "'val_scor'" in line and "val_acc, val_score" in line
    assert CheckpointStore(str(tmp_path / "r")).steps() == [1, 2, 3]  # nothing deleted
    zero = run("gc", str(tmp_path / "r"), "--keep-last", "0")
    assert zero.returncode == 2 and "--keep-last must be a positive integer" in one_clear_line(zero)


def test_gc_on_a_read_only_root_is_an_error_not_kept(tmp_path):
    from mounts import remount_read_only, tmpfs

    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        root = mnt / "r"
        store = CheckpointStore(str(root))
        with store.writer(1) as w:
            w.add_bytes("f", b"x")
        abandoned = root / "step-00000002.tmp-otherhost.1.abcd"
        abandoned.mkdir()
        remount_read_only(mnt)  # a real read-only filesystem, for a real CLI process
        out = run("gc", str(root), "--keep-last", "1", "--grace", "0")
        assert out.returncode == 2, out.stdout + out.stderr
        line = one_clear_line(out)
        assert "read-only filesystem" in line and "kept" not in line, line
        assert abandoned.is_dir() and store.steps() == [1]


def test_messages_name_the_flag_and_the_whole_url(tmp_path):
    payload = tmp_path / "f"
    payload.write_bytes(b"x")
    root = str(tmp_path / "r")
    assert run("put", str(payload), root, "--step", "1").returncode == 0
    again = run("put", str(payload), root, "--step", "1")
    assert again.returncode == 2 and "pass --replace" in one_clear_line(again)
    odd = run("verify", "foo://bucket/x")
    assert odd.returncode == 2 and "foo://bucket/x" in one_clear_line(odd)


def test_secrets_never_printed_by_the_new_commands(tmp_path):
    secret_url = "s3://AKIAXXXX:s3cr3tkey@no-such-bucket/run?sig=topsecret"
    for args in (
        ["inspect", secret_url],
        ["export", secret_url, str(tmp_path / "m.keras")],
        ["cp", secret_url, str(tmp_path / "c")],
        ["cp", str(tmp_path), secret_url],
        ["rm", secret_url, "--step", "1"],
    ):
        out = run(
            *args,
            "--storage-options",
            json.dumps({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}),
            env={"AWS_MAX_ATTEMPTS": "1"},
            timeout=120,
        )
        assert out.returncode in (2, 3), (args, out.stderr)
        text = out.stdout + out.stderr
        assert "s3cr3tkey" not in text and "topsecret" not in text and "AKIAXXXX" not in text


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = ["MANIFEST_NAME", "sha"]


@pytest.mark.parametrize(
    "src, dst, given, expected",
    [
        ("/data/run", "s3://b/run", None, "SRC"),  # local: the options are the destination's
        ("s3://a/run", "s3a://b/run", None, "SRC"),  # one kind of store
        ("s3://a/run", "az://c/run", None, None),  # another: its environment
        ("s3://a/run", "az://c/run", "DST", "DST"),  # its own flag
    ],
)
def test_cp_gives_the_destination_options_that_are_its_own(src, dst, given, expected):
    import argparse

    from forge_dist.cli.commands.cp import _dst_options

    args = argparse.Namespace(src=src, dst=dst, storage_options="SRC", dst_storage_options=given)
    assert _dst_options(args) == expected


def test_secret_storage_options_are_among_what_the_cli_redacts():
    import argparse

    from forge_dist.cli.main import _option_secrets

    options = {"account_key": "K3Y", "client_kwargs": {"endpoint_url": "http://x"}}
    args = argparse.Namespace(
        storage_options=json.dumps(options),
        dst_storage_options=json.dumps({"connection_string": "AccountKey=Z", "sas_token": "S"}),
    )
    assert sorted(_option_secrets(args)) == ["AccountKey=Z", "K3Y", "S"]
