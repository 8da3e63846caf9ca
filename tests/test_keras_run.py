"""Run identity: every checkpoint says which run and which model wrote it; a fresh run
into another run's root, or a resume of another model, is refused before the first step;
retention never deletes the step just committed nor another run's steps."""

from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras", reason="Keras is in the [tf] extra")

from kerashelp import LOCAL, Steps, fit, make_model  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.errors import ConfigurationError  # noqa: E402
from forge_dist.keras.run import RunConflictError, model_fingerprint  # noqa: E402
from forge_dist.storage import MANIFEST_NAME, CheckpointStore  # noqa: E402


def ckpt(root, **kw):
    return fk.ChiefModelCheckpoint(str(root), communicator=LOCAL, **kw)


def test_each_manifest_names_its_run_and_model_and_a_resume_keeps_the_run(tmp_path):
    root = tmp_path / "r"
    model = make_model()
    fit(model, [ckpt(root, run_name="exp-7")], epochs=2)
    first = CheckpointStore(str(root)).newest().manifest.run
    assert first["name"] == "exp-7" and len(first["id"]) == 12
    assert first["model_fingerprint"] == model_fingerprint(model)
    fresh = make_model()
    restored = fk.restore_latest(fresh, str(root), communicator=LOCAL, verbose=0)
    assert restored.run["id"] == first["id"]
    fit(fresh, [ckpt(root)], epochs=3, initial_epoch=restored.initial_epoch)
    assert {c.manifest.run["id"] for c in CheckpointStore(str(root)).list()} == {first["id"]}
    assert CheckpointStore(str(root)).newest().manifest.run["name"] == "exp-7"  # inherited


def test_a_fresh_run_into_another_runs_root_is_refused_before_the_first_step(tmp_path):
    old = tmp_path / "old"
    fit(make_model(), [ckpt(old, run_name="yesterday")], epochs=2)
    root = tmp_path / "r"
    shutil.copytree(old, root)  # cp -r of another run's checkpoints
    steps = Steps()
    with pytest.raises(RunConflictError) as err:
        fit(make_model(), [ckpt(root), steps], epochs=3)
    msg = str(err.value)
    assert steps.batches == 0
    assert "(yesterday)" in msg and "newest step 8" in msg
    assert "restore_latest" in msg and "another directory" in msg and "overwrite=" in msg
    assert CheckpointStore(str(root)).steps() == [4, 8]  # nothing lost


@pytest.mark.parametrize("how", ["delete", "archive"])
def test_overwrite_deletes_or_archives_the_old_steps_first(tmp_path, how):
    root = tmp_path / "r"
    fit(make_model(), [ckpt(root)], epochs=2)
    old_id = CheckpointStore(str(root)).newest().manifest.run["id"]
    fit(make_model(), [ckpt(root, overwrite=how)], epochs=1)
    infos = CheckpointStore(str(root)).list()
    assert [c.step for c in infos] == [4] and infos[0].manifest.run["id"] != old_id
    archived = [n for n in os.listdir(root) if n.startswith("archive-")]
    assert len(archived) == (how == "archive")
    if archived:
        assert sorted(os.listdir(root / archived[0])) == ["step-00000004", "step-00000008"]


def test_an_all_corrupt_root_is_reported_and_not_silently_reused(tmp_path):
    root = tmp_path / "r"
    fit(make_model(), [ckpt(root)], epochs=2)
    for step in ("step-00000004", "step-00000008"):
        (root / step / MANIFEST_NAME).write_text("{damaged")
    model = make_model()
    restored = fk.restore_latest(model, str(root), communicator=LOCAL, verbose=0)
    assert not restored.restored and restored.skipped == ["step-00000008", "step-00000004"]
    with pytest.raises(RunConflictError, match="2 of them corrupt"):
        fit(model, [ckpt(root)], epochs=1)


def test_resuming_a_different_model_names_both_fingerprints(tmp_path):
    root = tmp_path / "r"
    fit(make_model(units=4), [ckpt(root)], epochs=1)
    other = make_model(units=8)
    with pytest.raises(ConfigurationError, match="holds a different model") as err:
        fk.restore_latest(other, str(root), communicator=LOCAL)
    assert model_fingerprint(other) in str(err.value)


def test_retention_keeps_the_step_just_committed_and_leaves_other_runs_alone(tmp_path):
    root, other = tmp_path / "r", tmp_path / "other"
    # Another run's steps, with better metrics and higher step numbers, appear in the
    # root while this run goes on (copied in by hand).
    fit(make_model(lr=0.2), [ckpt(other)], epochs=4)
    model = make_model(lr=0.001)
    fit(model, [ckpt(root, keep_last=1, keep_best=1)], epochs=1)
    for name in ("step-00000012", "step-00000016"):
        shutil.copytree(other / name, root / name)
    cb = ckpt(root, keep_last=1, keep_best=1)
    fit(model, [cb], epochs=2, initial_epoch=1)  # step 8 of this run
    store = CheckpointStore(str(root))
    mine = cb.run["id"]
    assert cb.last_saved_step == 8 and 8 in store.steps()  # the step just committed survived
    assert {c.step for c in store.list() if c.manifest.run["id"] != mine} == {12, 16}
