"""Retention and gc of dead writers' staging, against local disk, ``memory://`` and S3."""

from __future__ import annotations

import os

from storehelp import commit

from forge_dist.policy import Retention


def test_retention_keeps_last_and_best_and_always_the_newest(target):
    store = target.store()
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.4, 5: 0.8, 6: 0.7}
    for step, loss in losses.items():
        commit(store, step, {"w": str(step).encode()}, metrics={"val_loss": loss})
    kept, deleted = store.apply_retention(Retention(keep_last=2, keep_best=1, monitor="val_loss"))
    assert kept == [2, 5, 6]
    assert deleted == [1, 3, 4]
    assert store.steps() == [2, 5, 6]
    assert all(store.verify(s).ok for s in store.steps())
    assert store.list_staging() == []
    # keep_last=1 alone still keeps the newest only.
    store.apply_retention(Retention(keep_last=1))
    assert store.steps() == [6]


def test_retention_keeps_a_step_that_lacks_the_monitored_value(target):
    store = target.store()
    # Steps 2 and 4 were saved at epochs without validation (Keras' validation_freq).
    losses = {1: 0.9, 2: None, 3: 0.1, 4: None, 5: 0.5, 6: 0.4}
    for step, loss in losses.items():
        commit(
            store, step, {"w": b"x"}, metrics={"loss": 1.0, **({"val_loss": loss} if loss else {})}
        )
    kept, deleted = store.apply_retention(Retention(keep_last=1, keep_best=1, monitor="val_loss"))
    assert kept == [2, 3, 4, 6]  # the newest, the best (3), and the two without a value
    assert deleted == [1, 5]
    assert store.steps() == [2, 3, 4, 6]


def test_retention_keeps_the_end_of_an_epoch_whose_weights_are_asked_back(target):
    """Early stopping's best: the step that ended that epoch is kept, whatever keep_last
    says (a mid-epoch step of that epoch is no substitute)."""
    store = target.store()
    ends = {3: (0, True), 5: (1, False), 6: (1, True), 9: (2, True), 12: (3, True)}
    for step, (epoch, done) in ends.items():
        commit(store, step, {"w": b"x"}, state={"epoch": epoch, "epoch_done": done})
    kept, deleted = store.apply_retention(Retention(keep_last=1), protect_epochs=[1])
    assert kept == [6, 12] and deleted == [3, 5, 9]


def test_removing_the_root_leaves_what_is_not_the_stores(target):
    store = target.store()
    commit(store, 1, {"w": b"x"})
    store.take_lease("run")
    store.delete(1)
    store.remove_root()
    if target.kind != "local":
        assert store.steps() == [] and store.lease() is None
    else:
        assert not os.path.exists(target.url)  # the folder was left empty: gone
        commit(store, 2, {"w": b"x"})
        store.delete(2)
        with open(os.path.join(target.url, "notes.txt"), "w") as f:
            f.write("mine")
        store.remove_root()
        assert os.listdir(target.url) == ["notes.txt"]


def test_gc_removes_abandoned_staging_but_not_a_live_writer(target):
    store = target.store()
    commit(store, 1, {"a": b"1"})
    live = store.writer(2)
    live.begin()
    live.add_bytes("a", b"in progress")
    report = target.store().gc(grace_s=3600)
    assert report.removed_staging == []
    assert len(report.kept_staging) == 1
    live.add_bytes("b", b"more")
    live.commit()
    assert store.verify(2, strict=True).ok

    abandoned = store.writer(3)
    abandoned.begin()
    abandoned.add_bytes("a", b"never committed")
    dry = target.store().gc(grace_s=0, dry_run=True)
    assert len(dry.removed_staging) == 1 and len(store.list_staging()) == 1
    report = target.store().gc(grace_s=0)
    assert len(report.removed_staging) == 1
    assert store.list_staging() == []
    assert store.steps() == [1, 2]
