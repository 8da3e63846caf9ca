"""Event files written and cut back with the tensorboard package, read by its loader."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard", reason="tensorboard is in the [tf] extra")

from forge_dist.keras.tb_events import ScalarWriter, scalar_values, truncate_events  # noqa: E402


def write(folder, rows):
    w = ScalarWriter(str(folder))
    for tag, step, value in rows:
        w.scalars({tag: value}, step)
    w.close()


def test_scalars_read_back_with_tensorboards_loader(tmp_path):
    write(tmp_path, [("epoch_loss", 0, 1.0), ("epoch_loss", 1, 0.5), ("batch_loss", 7, 2.0)])
    got = scalar_values(str(tmp_path))
    assert got == {"epoch_loss": [(0, 1.0), (1, 0.5)], "batch_loss": [(7, 2.0)]}


def test_truncate_keeps_what_the_checkpoint_covers(tmp_path):
    rows = [("epoch_loss", e, float(e)) for e in range(4)]
    rows += [("batch_loss", s, float(s)) for s in (8, 16, 24, 32)]
    rows += [("evaluation_loss_vs_iterations", s, 1.0) for s in (8, 16, 24)]
    write(tmp_path, rows)
    (path,) = [p for p in tmp_path.iterdir() if "tfevents" in p.name]
    assert truncate_events(str(path), epoch=1, step=20)
    got = scalar_values(str(tmp_path))
    assert [s for s, _ in got["epoch_loss"]] == [0, 1]
    assert [s for s, _ in got["batch_loss"]] == [8, 16]
    assert [s for s, _ in got["evaluation_loss_vs_iterations"]] == [8, 16]
    assert not truncate_events(str(path), epoch=1, step=20)  # nothing more to drop
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp left
