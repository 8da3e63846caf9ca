"""The ``forge-dist`` command as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys

import pytest
from clihelp import make_root, one_clear_line, run

from forge_dist.storage import MANIFEST_NAME, CheckpointStore

FORGE = os.path.join(os.path.dirname(sys.executable), "forge-dist")


def test_verify_exit_codes_and_json(cli_target):
    t = cli_target
    store = make_root(t)
    env = t.env
    ok = run("verify", t.url, "--all", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout
    js = json.loads(run("verify", t.url, "--json", env=env).stdout)
    assert js["ok"] is True and js["exit_code"] == 0 and js["mode"] == "full"
    assert [c["step"] for c in js["checkpoints"]] == [2]  # the newest by default
    assert js["checkpoints"][0]["files_checked"] == 2

    fs, root = __import__("fsspec").core.url_to_fs(t.url, **(t.options or {}))
    fs.pipe_file(f"{root}/step-00000001/model.bin", b"Payload")  # same size, altered
    bad = run("verify", t.url, "--all", env=env)
    assert bad.returncode == 1
    assert "step-00000001/model.bin" in bad.stdout and "sha256 mismatch" in bad.stdout
    assert "FAILED" in bad.stdout
    assert run("verify", t.url, "--all", "--fast", env=env).returncode == 0
    assert run("verify", t.url, "--step", "2", env=env).returncode == 0
    assert run("verify", t.url, "--step", "1", env=env).returncode == 1
    assert run("verify", f"{t.url}/step-00000001", env=env).returncode == 1
    assert run("verify", f"{t.url}/step-00000002", env=env).returncode == 0
    missing = run("verify", t.url, "--step", "9", "--json", env=env)
    assert missing.returncode == 3
    assert json.loads(missing.stdout)["exit_code"] == 3

    fs.pipe_file(f"{root}/step-00000002/notes.txt", b"unlisted")
    lenient = run("verify", t.url, env=env)
    assert lenient.returncode == 0 and "unlisted" in lenient.stdout
    assert run("verify", t.url, "--strict", env=env).returncode == 1
    # The store agrees with the CLI on all of it.
    assert store.verify(2).ok and not store.verify(2, strict=True).ok
    assert not store.verify(1).ok and store.verify(1, full=False).ok


def test_verify_reports_each_problem_by_file(tmp_path):
    root = tmp_path / "root"
    store = CheckpointStore(str(root))
    with store.writer(1) as w:
        w.add_bytes("a.bin", b"a" * 100)
        w.add_bytes("b.bin", b"b" * 100)
        w.add_bytes("c.bin", b"c" * 100)
    ck = root / "step-00000001"
    (ck / "a.bin").write_bytes(b"a" * 50)
    (ck / "b.bin").unlink()
    (ck / "c.bin").write_bytes(b"C" + b"c" * 99)
    out = run("verify", str(root))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert any("a.bin" in x and "expected 100 bytes, found 50" in x for x in lines)
    assert any("b.bin" in x and "missing" in x for x in lines)
    assert any("c.bin" in x and "sha256 mismatch" in x for x in lines)
    assert lines[-1].startswith("FAILED") and "3 problems" in lines[-1]


def test_no_committed_checkpoint_exits_3_and_reports_staging(tmp_path):
    root = tmp_path / "root"
    store = CheckpointStore(str(root))
    w = store.writer(4)
    w.begin()
    w.add_bytes("a", b"x")
    out = run("verify", str(root), "--json")
    assert out.returncode == 3
    js = json.loads(out.stdout)
    assert js["checkpoints"] == [] and js["staging"][0]["step"] == 4
    (staging,) = [p for p in root.iterdir()]
    assert run("verify", str(staging)).returncode == 3  # a staging folder with no manifest
    assert run("ls", str(root)).returncode == 3
    w.abort()


def test_ls_table_and_json(cli_target):
    t = cli_target
    make_root(t, steps=(3, 12))
    out = run("ls", t.url, env=t.env)  # a pipe: one plain line per step
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[1].startswith("12 ") and "val_loss=0.0833333" in lines[1], out.stdout
    table = on_a_terminal(["ls", t.url], t.env)  # a terminal: a table
    assert "┃ step" in table and "val_loss=0.0833333" in table, table
    js = json.loads(run("ls", t.url, "--json", env=t.env).stdout)
    assert [c["step"] for c in js["checkpoints"]] == [3, 12]
    c = js["checkpoints"][1]
    assert c["files"] == 2 and c["bytes"] == 7 * 12 + 12 and c["ok"] is True
    assert c["metrics"]["val_loss"] == pytest.approx(1 / 12)
    assert set(js) == {"command", "url", "exit_code", "checkpoints", "staging", "best_step"}


def read_all(fd):
    """Everything a pseudo-terminal's other end wrote, until it closed."""
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return seen
        if not chunk:
            return seen
        seen += chunk


def on_a_terminal(args, env, columns=160):
    """What ``forge-dist ARGS`` prints with a terminal as its stdout."""
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(
        [FORGE, *args], stdout=slave, stderr=subprocess.DEVNULL, env={**os.environ, **env}
    )
    os.close(slave)
    seen = read_all(master)
    proc.wait(timeout=60)
    os.close(master)
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", seen.decode(errors="replace"))  # colours off


def test_put_then_gc(cli_target, tmp_path):
    t = cli_target
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "w.bin").write_bytes(os.urandom(2000))
    (src / "d" / "x.json").write_text("{}")
    for step, loss in ((1, 0.5), (2, 0.2), (3, 0.9), (4, 0.8)):
        put = run(
            "put",
            str(src),
            t.url,
            "--step",
            str(step),
            "--meta",
            f"val_loss={loss}",
            "--meta",
            "note=hello",
            env=t.env,
        )
        assert put.returncode == 0, put.stderr
    again = run("put", str(src), t.url, "--step", "4", env=t.env)
    assert again.returncode == 2 and "replace" in one_clear_line(again)
    info = t.store().get(2)
    assert info.metrics == {"val_loss": 0.2} and info.state == {"meta": {"note": "hello"}}
    assert {e.path for e in info.manifest.files} == {"w.bin", "d/x.json"}

    dry = run(
        "gc",
        t.url,
        "--keep-last",
        "1",
        "--keep-best",
        "1",
        "--monitor",
        "val_loss",
        "--dry-run",
        "--json",
        env=t.env,
    )
    assert json.loads(dry.stdout)["deleted_steps"] == [1, 3]
    assert t.store().steps() == [1, 2, 3, 4]
    gc = run(
        "gc", t.url, "--keep-last", "1", "--keep-best", "1", "--monitor", "val_loss", env=t.env
    )
    assert gc.returncode == 0 and "deleted step 1" in gc.stdout
    assert t.store().steps() == [2, 4]
    assert run("verify", t.url, "--all", "--strict", env=t.env).returncode == 0
    bad = run("gc", t.url, "--keep-last", "1", "--keep-best", "1", env=t.env)
    assert bad.returncode == 2 and "--monitor" in one_clear_line(bad)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["verify", "{missing}"], "does not exist"),
        (["verify", "{file}"], "not a directory"),
        (["ls", "{file}"], "not a directory"),
        (["verify", "{root}", "--storage-options", "{{nope"], "not valid JSON"),
        (["verify", "{root}", "--step", "1", "--all"], "cannot be used together"),
        (["verify", "gs://bucket/x"], "forge-dist[gcs]"),
        (["put", "{missing}", "{root}", "--step", "1"], "does not exist"),
        (["put", "{file}", "{root}", "--step", "1", "--meta", "novalue"], "KEY=VALUE"),
        (["gc", "{root}"], "--keep-last"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_errors_are_one_clear_line_with_exit_2(tmp_path, args, needle, without_gcsfs):
    (tmp_path / "root").mkdir()
    (tmp_path / "f").write_text("x")
    paths = {"missing": tmp_path / "missing", "file": tmp_path / "f", "root": tmp_path / "root"}
    out = run(*[a.format(**paths) for a in args], env=without_gcsfs)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert needle in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = run("verify", str(tmp_path / "missing"), "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr


def without_permission_override(*cmd: str) -> list[str]:
    """``cmd`` as a process that file permissions apply to: as is for a normal user; for
    root, without the capabilities that let root read and search anything (the user
    stays root, so this venv under root's home is still reachable)."""
    if os.geteuid() != 0:
        return list(cmd)
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's permission override")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", "--inh-caps=-all", f"--bounding-set={drop}", *cmd]


def test_an_unreadable_root_is_exit_2(tmp_path):
    root = tmp_path / "root"
    CheckpointStore(str(root)).put(__file__, 1)
    root.chmod(0o000)
    try:
        out = subprocess.run(
            without_permission_override(FORGE, "verify", str(root)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        root.chmod(0o755)
    assert out.returncode == 2, out.stdout + out.stderr
    line = one_clear_line(out)
    assert "permission denied" in line and str(root) in line, line


def test_unreachable_s3_endpoint_is_one_line_and_bounded(s3):
    env = {**s3.env(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    try:  # s3fs's retries give up after ~25 s here; a CLI that kept retrying fails this
        out = run("ls", f"s3://{s3.bucket}/x", env=env, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("forge-dist ls kept retrying an endpoint that refuses connections")
    assert out.returncode == 2
    line = one_clear_line(out)
    assert "Could not connect to the endpoint URL" in line, line


def test_missing_bucket_and_bad_endpoint_are_clear(s3):
    out = run("verify", "s3://no-such-bucket/run", env=s3.env())
    assert out.returncode == 2 and "does not exist" in one_clear_line(out)
    bad = json.dumps({"client_kwargs": {"endpoint_url": "not a url"}})
    out = run("ls", f"s3://{s3.bucket}/x", "--storage-options", bad, env=s3.env())
    assert out.returncode == 2
    one_clear_line(out)


def test_credentials_and_queries_are_redacted(s3):
    url = "s3://AKIAEXAMPLE:supersecretkey@no-such-bucket/run?X-Amz-Signature=abcdef"
    out = run("verify", url, "--json", env=s3.env())
    text = out.stdout + out.stderr
    assert out.returncode == 2
    assert "supersecretkey" not in text and "abcdef" not in text and "AKIAEXAMPLE" not in text
    assert json.loads(out.stdout)["url"] == "s3://***@no-such-bucket/run?***"


def _service_account_key(path, token_uri):
    """A service-account key file as Google issues them, with a fresh RSA key, whose
    token endpoint is a closed port on 127.0.0.1 (nothing leaves this machine)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    doc = {
        "type": "service_account",
        "project_id": "forge-test",
        "private_key_id": "CANARYKEYID" + os.urandom(6).hex(),
        "private_key": pem,
        "client_email": "canary@forge-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(doc))
    return [doc["private_key_id"], *pem.splitlines()[1:-1]]


def test_azure_and_gcs_credentials_never_appear_in_any_output(az, gs, tmp_path):
    """A canary secret in an Azure connection string (account key), an Azure SAS token and
    a GCS service-account key, each given the usual way (environment, storage option,
    key file): the command fails with one line (the emulator refuses the key, the token
    endpoint is closed) and no output holds any of it."""
    import base64

    from emulators import AZ_KEY

    key = base64.b64encode(b"CANARY-account-key-" + os.urandom(16)).decode()
    wrong_key = az.connection_string().replace(AZ_KEY, key)
    sig = "CANARYSIG" + os.urandom(8).hex()
    sas = f"sv=2023-01-03&ss=b&srt=sco&sp=rl&se=2099-01-01T00:00:00Z&sig={sig}"
    sas_string = f"BlobEndpoint={az.url}/devstoreaccount1;SharedAccessSignature={sas}"
    secrets = [key, sig, *_service_account_key(tmp_path / "sa.json", "http://127.0.0.1:9/t")]
    gs_env = {k: v for k, v in gs.env().items() if not k.startswith("FSSPEC_GS")}
    az_url, gs_url = f"az://{az.bucket}/canary", f"gs://{gs.bucket}/canary"
    cases = [
        (["ls", az_url], {"AZURE_STORAGE_CONNECTION_STRING": wrong_key}),
        (["verify", az_url, "--storage-options", json.dumps({"connection_string": wrong_key})], {}),
        (["ls", az_url], {"AZURE_STORAGE_CONNECTION_STRING": sas_string}),
        (["ls", gs_url], {**gs_env, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "sa.json")}),
        (
            [
                "verify",
                gs_url,
                "--storage-options",
                json.dumps({"token": str(tmp_path / "sa.json")}),
            ],
            gs_env,
        ),
    ]
    for args, env in cases:
        out = run(*args, env=env, timeout=150)
        assert out.returncode == 2, (args[:2], out.stdout, out.stderr)
        one_clear_line(out)
        text = out.stdout + out.stderr
        assert not [s for s in secrets if s in text], (args[:2], text)


def test_progress_bar_on_a_terminal(tmp_path):
    root = tmp_path / "root"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20_000_000))
    CheckpointStore(str(root)).put(big, 1)
    master, slave = pty.openpty()
    proc = subprocess.Popen([FORGE, "verify", str(root)], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = read_all(master)
    assert proc.wait(timeout=60) == 0
    assert b"hashing" in seen and b"20.0 MB" in seen
    # Not on a pipe: scripts get clean output.
    assert (
        b"hashing" not in subprocess.run([FORGE, "verify", str(root)], capture_output=True).stderr
    )


def test_cli_and_package_never_import_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "import forge_dist, forge_dist.storage, forge_dist.policy\n"
        "from forge_dist.cli.main import main\n"
        f"main(['ls', {str(tmp_path)!r}])\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'tf_keras', 'horovod', 'mpi4py')]\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "clean" in out.stdout, out.stderr


def test_manifest_is_what_design_md_says(tmp_path):
    store = CheckpointStore(str(tmp_path / "r"))
    with store.writer(12, metrics={"val_loss": 0.41}, state={"es": {"wait": 0}}) as w:
        w.add_bytes("model.keras", b"k" * 10)
    doc = json.loads((tmp_path / "r" / "step-00000012" / MANIFEST_NAME).read_text())
    assert doc["format"] == "forge-dist/1" and doc["step"] == 12
    assert set(doc["writer"]) >= {"host", "rank", "world_size", "backend"}
    assert doc["files"] == [
        {
            "path": "model.keras",
            "size": 10,
            "sha256": __import__("hashlib").sha256(b"k" * 10).hexdigest(),
        }
    ]
    assert doc["metrics"] == {"val_loss": 0.41} and doc["state"] == {"es": {"wait": 0}}
    assert "forge_dist" in doc["versions"]
    assert doc["created"].endswith("+00:00")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("/data/run", "/data/run"),
        ("s3://bucket/run", "s3://bucket/run"),
        ("s3://KEY:SECRET@bucket/run", "s3://***@bucket/run"),
        ("https://host/x?sig=abc#frag", "https://host/x?***"),
        ("gs://tok@bucket", "gs://***@bucket"),
    ],
)
def test_redact_url(url, shown):
    from forge_dist._urls import redact_text, redact_url

    assert redact_url(url) == shown
    assert redact_text(f"cannot open {url}: no") == f"cannot open {shown}: no"


def test_redact_text_hides_connection_string_keys_and_private_keys():
    from forge_dist._urls import redact_text

    cs = "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=Q0FOQVJZ+/k==;BlobEndpoint=x"
    assert "Q0FOQVJZ" not in redact_text(f"bad {cs}") and "AccountName=acct" in redact_text(cs)
    assert "S1GN" not in redact_text("SharedAccessSignature=sv=2020&sig=S1GN;BlobEndpoint=y")
    pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY-----\n"
    assert "MIIEvQ" not in redact_text(f'{{"private_key": "{pem}"}}')
