"""Retention and gc of dead writers' staging, against local disk, ``memory://`` and S3."""

from __future__ import annotations

from storehelp import commit


def test_retention_keeps_last_and_best_and_always_the_newest(target):
    store = target.store()
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.4, 5: 0.8, 6: 0.7}
    for step, loss in losses.items():
        commit(store, step, {"w": str(step).encode()}, metrics={"val_loss": loss})
    kept, deleted = store.apply_retention(keep_last=2, keep_best=1, monitor="val_loss")
    assert kept == [2, 5, 6]
    assert deleted == [1, 3, 4]
    assert store.steps() == [2, 5, 6]
    assert all(store.verify(s).ok for s in store.steps())
    assert store.list_staging() == []
    # keep_last=1 alone still keeps the newest only.
    store.apply_retention(keep_last=1)
    assert store.steps() == [6]


def test_retention_keeps_a_step_that_lacks_the_monitored_value(target):
    store = target.store()
    # Steps 2 and 4 were saved at epochs without validation (Keras' validation_freq).
    losses = {1: 0.9, 2: None, 3: 0.1, 4: None, 5: 0.5, 6: 0.4}
    for step, loss in losses.items():
        commit(
            store, step, {"w": b"x"}, metrics={"loss": 1.0, **({"val_loss": loss} if loss else {})}
        )
    kept, deleted = store.apply_retention(keep_last=1, keep_best=1, monitor="val_loss")
    assert kept == [2, 3, 4, 6]  # the newest, the best (3), and the two without a value
    assert deleted == [1, 5]
    assert store.steps() == [2, 3, 4, 6]


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
