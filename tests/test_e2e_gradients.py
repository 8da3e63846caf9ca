"""Gradient averaging, against the arithmetic it promises: N ranks each on batches of b
samples end where one process ends on the concatenated batches of N·b with SGD (to float
tolerance after several steps), under mpirun, horovodrun, two TF_CONFIG workers and
MirroredStrategy, with and without ``compression="fp16"``.

The reference is plain Keras in one process, with no forge_dist code in it. SGD moves
the weights by exactly the learning rate times the gradient, so gradients summed instead
of averaged (or averaged twice, or over the wrong count) leave the weights far from it:
about a quarter of the distance they travelled, here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from multiproc import HERE, horovodrun, mpi_env, mpirun, read_rank_reports, run_bounded

pytestmark = pytest.mark.keras
SCRIPT = os.path.join(HERE, "_grad_train.py")
ROOT = os.path.dirname(HERE)
RANKS = 2
#: Largest weight difference from the reference allowed, as a share of the largest
#: distance a weight travelled: float32 rounding of the mean (seen: ~5e-8), fp16 gradients
#: (seen: ~7e-5). Summed gradients at two ranks land ~0.25 away.
TOLERANCE = {"none": 1e-5, "fp16": 2e-3}


def flavor_env(flavor: str) -> dict[str, str]:
    return {"TF_USE_LEGACY_KERAS": "1" if flavor == "tf_keras" else "0"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Plain Keras in one process on the global batches, per Keras flavour."""
    out: dict[str, dict] = {}

    def get(flavor: str) -> dict:
        if flavor not in out:
            path = tmp_path_factory.mktemp("ref") / f"{flavor}.json"
            cmd = [sys.executable, SCRIPT, "--backend", "local", "--ranks", str(RANKS), str(path)]
            run = run_bounded(cmd, mpi_env(flavor_env(flavor)), bound_s=180)
            assert run.returncode == 0, run.output[-3000:]
            out[flavor] = json.loads(path.read_text())
        return out[flavor]

    return get


def assert_same_steps(reports: list[dict], ref: dict, compressions: list[str]) -> None:
    initial = [np.asarray(w) for w in ref["initial"]]
    expected = [np.asarray(w) for w in ref["final"]["none"]]
    travelled = max(float(np.abs(e - i).max()) for e, i in zip(expected, initial, strict=True))
    assert travelled > 0.1, "the reference must move the weights"
    assert [r["rank"] for r in reports] == list(range(len(reports)))
    for r in reports:
        assert r["initial"] == ref["initial"]
        assert sorted(r["final"]) == sorted(compressions)
        for compression, weights in r["final"].items():
            got = [np.asarray(w) for w in weights]
            off = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
            assert off <= TOLERANCE[compression] * travelled, (
                f"rank {r['rank']}, compression={compression}: weights {off:.3g} from one "
                f"process on the concatenated batch (the weights moved {travelled:.3g})"
            )


BOTH = ["--compression", "none", "--compression", "fp16"]


@pytest.mark.mpi
@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_mpirun_ranks_step_as_one_process_on_the_whole_batch(tmp_path, reference, flavor):
    out = str(tmp_path / "r{rank}.json")
    run = mpirun(RANKS, [SCRIPT, "--backend", "mpi", *BOTH, out], flavor_env(flavor), 180)
    assert run.returncode == 0, run.output[-3000:]
    reports = read_rank_reports(out, RANKS)
    assert {r["backend"] for r in reports} == {"mpi"}
    assert_same_steps(reports, reference(flavor), ["none", "fp16"])


@pytest.mark.horovod
@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_horovodrun_ranks_step_as_one_process_on_the_whole_batch(tmp_path, reference, flavor):
    out = str(tmp_path / "r{rank}.json")
    run = horovodrun(RANKS, [SCRIPT, "--backend", "horovod", *BOTH, out], flavor_env(flavor), 180)
    assert run.returncode == 0, run.output[-3000:]
    reports = read_rank_reports(out, RANKS)
    assert {r["backend"] for r in reports} == {"horovod"}
    assert_same_steps(reports, reference(flavor), ["none", "fp16"])


def test_multiworker_workers_step_as_one_process_on_the_whole_batch(tmp_path, reference):
    pytest.importorskip("tf_keras", reason="tf_keras is in the [tf] extra")
    out = str(tmp_path / "r{rank}.json")
    launch = os.path.join(ROOT, "scripts", "launch_mwms.sh")
    env = mpi_env(
        {"PYTHON_OVERRIDE": sys.executable, "TRAIN_SCRIPT": SCRIPT, **flavor_env("tf_keras")}
    )
    # The strategy averages the gradients; DistributedOptimizer must add nothing, fp16
    # asked for or not.
    run = run_bounded([launch, "--compression", "fp16", out], env, bound_s=240)
    assert run.returncode == 0, run.output[-3000:]
    reports = read_rank_reports(out, RANKS)
    assert {r["backend"] for r in reports} == {"tf"}
    assert_same_steps(reports, reference("tf_keras"), ["fp16"])


@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_mirrored_replicas_step_as_one_process_on_the_whole_batch(tmp_path, reference, flavor):
    out = str(tmp_path / "r{rank}.json")
    cmd = [sys.executable, SCRIPT, "--backend", "mirrored", "--ranks", str(RANKS), *BOTH, out]
    run = subprocess.run(
        cmd, env=mpi_env(flavor_env(flavor)), capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reports = read_rank_reports(out, 1)
    assert reports[0]["backend"] == "tf" and reports[0]["size"] == RANKS
    assert_same_steps(reports, reference(flavor), ["none", "fp16"])
