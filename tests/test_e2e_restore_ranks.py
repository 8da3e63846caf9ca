"""``restore_latest`` across ranks under ``mpirun -np 2``: every rank reads the step the
chief picked and verifies it itself, the chief's arrays travel only to make up for a
rank that could not (its root local to another node, or a copy that differs), and
``read_on="chief"`` reads on the chief alone. Rank 1's own view of a root is a real mount
namespace with its own tmpfs (tests/_restore_ranks.py)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from multiproc import HERE, mpirun, read_rank_reports

pytestmark = [pytest.mark.mpi, pytest.mark.keras]
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.storage import CheckpointStore  # noqa: E402

SCRIPT = os.path.join(HERE, "_restore_ranks.py")


def test_every_rank_reads_the_step_itself_and_only_verified_bytes_reach_a_rank(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a rank's own mount namespace needs root")
    shared = tmp_path / "shared"
    model = make_model(units=2048)
    fit(model, [fk.ChiefModelCheckpoint(str(shared), communicator=LOCAL)], epochs=1)
    np.savez(tmp_path / "older.npz", *model.get_weights())
    fit(model, [fk.ChiefModelCheckpoint(str(shared), communicator=LOCAL)], 2, initial_epoch=1)
    weights = model.get_weights()
    np.savez(tmp_path / "expected.npz", *weights)
    weight_bytes = sum(w.nbytes for w in weights)
    older, info = CheckpointStore(str(shared)).list()
    for copy in ("private/local", "private/flipped", "private/chief-flipped", "flipped-src"):
        shutil.copytree(shared, tmp_path / copy)
    name = info.manifest.files[0].path
    for flipped in ("flipped-src", "private/chief-flipped"):
        step_file = tmp_path / flipped / info.name / name
        data = bytearray(step_file.read_bytes())
        data[len(data) // 2] ^= 1
        step_file.write_bytes(data)

    out = str(tmp_path / "r{rank}.json")
    run = mpirun(2, [SCRIPT, str(tmp_path), out], {"FORGE_DIST_TIMEOUT": "60"}, bound_s=180)
    assert run.returncode == 0, run.output[-4000:]
    chief, other = read_rank_reports(out)
    size = info.manifest.files[0].size
    for case in ("shared", "chief", "local", "flipped", "chief-flipped"):
        step, epoch = (older.step, 1) if case == "chief-flipped" else (info.step, 2)
        for r in (chief, other):
            assert r[case]["equal"], (case, r[case])
            assert (r[case]["step"], r[case]["initial_epoch"]) == (step, epoch), (case, r[case])
    assert other["local"]["sees_root"] is False and chief["local"]["sees_root"] is True

    # One root both ranks see: each read the step once, and no weights were sent.
    assert chief["shared"]["reads"] == other["shared"]["reads"] == [size]
    assert chief["shared"]["largest_broadcast"] < weight_bytes / 4, chief["shared"]
    # Ranks reading at once read through the page cache (a host's ranks share one read
    # of a local file); the chief reading alone reads around it.
    assert chief["shared"]["direct"] == other["shared"]["direct"] == [False]
    assert chief["chief"]["direct"] == [True]
    # read_on="chief": the chief alone read it, and sent the weights.
    assert chief["chief"]["reads"] == [size] and other["chief"]["reads"] == []
    assert chief["chief"]["largest_broadcast"] > weight_bytes
    # Rank 1 could not read (no such root on its "node"), or read a copy that does not
    # verify: it holds the chief's verified arrays, sent for it.
    assert other["local"]["reads"] == ["StorageError"] and chief["local"]["reads"] == [size]
    assert chief["local"]["largest_broadcast"] > weight_bytes
    assert other["flipped"]["reads"] == ["IntegrityError"], other["flipped"]
    assert chief["flipped"]["reads"] == [size]
    assert chief["flipped"]["largest_broadcast"] > weight_bytes
    # The chief's newest step does not verify: every rank drops that one (rank 1's own
    # intact copy too) and reads the older step the chief goes on to.
    assert chief["chief-flipped"]["reads"] == ["IntegrityError", size]
    assert other["chief-flipped"]["reads"] == [size, size]
    assert chief["chief-flipped"]["largest_broadcast"] < weight_bytes / 4


def test_a_wrong_read_on_is_an_error_naming_the_choices(tmp_path):
    with pytest.raises(ConfigurationError, match="read_on must be 'every_rank' or 'chief'"):
        fk.restore_latest(make_model(), str(tmp_path), communicator=LOCAL, read_on="all")
