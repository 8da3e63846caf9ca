"""Which samples each rank trains on from a whole dataset: pure, tested with ranges."""

from __future__ import annotations

import itertools

import pytest

from forge_dist.errors import ConfigurationError
from forge_dist.policy import check_shardable, samples_done, shard_rows


def _epoch(n, offset, batch_size, size):
    return [shard_rows(n, offset, batch_size, size, r) for r in range(size)]


@pytest.mark.parametrize(
    "n, batch_size, size", list(itertools.product([1, 7, 64, 100, 203], [1, 4, 8], [1, 2, 3, 4]))
)
def test_every_sample_once_and_the_same_steps_on_every_rank(n, batch_size, size):
    for offset in range(0, n + 1, max(1, n // 5)):
        try:
            ranks = _epoch(n, offset, batch_size, size)
        except ConfigurationError:
            short = (n - offset) % (batch_size * size)
            assert 0 < short < size  # refused only where a rank would have nothing
            continue
        assert len({len(steps) for steps in ranks}) == 1  # same step count everywhere
        trained = sorted(i for steps in ranks for rng in steps for i in rng)
        assert trained == list(range(offset, n))
        for steps in ranks:
            assert all(0 < len(rng) <= batch_size for rng in steps)


def test_rank_r_trains_on_the_rth_batch_of_each_global_batch():
    assert shard_rows(20, 0, 4, 2, 0) == [range(0, 4), range(8, 12), range(16, 18)]
    assert shard_rows(20, 0, 4, 2, 1) == [range(4, 8), range(12, 16), range(18, 20)]
    # From sample 6 on three ranks: one full global batch of 12, then 2 left for 3 ranks.
    with pytest.raises(ConfigurationError, match="2 sample\\(s\\) for 3 ranks"):
        shard_rows(20, 6, 4, 3, 0)
    assert [shard_rows(21, 6, 4, 3, r) for r in range(3)] == [
        [range(6, 10), range(18, 19)],
        [range(10, 14), range(19, 20)],
        [range(14, 18), range(20, 21)],
    ]


def test_a_global_offset_means_the_same_samples_at_any_rank_count():
    done = samples_done(200, 0, 8, 2, 4)  # 4 steps at 2 ranks
    assert done == 64
    rest = {i for r in range(4) for rng in shard_rows(200, done, 8, 4, r) for i in rng}
    assert rest == set(range(64, 200))
    assert samples_done(200, 64, 8, 4, 100) == 200  # capped at the epoch's end


def test_a_position_outside_the_data_is_refused():
    with pytest.raises(ConfigurationError, match="outside the 100 samples"):
        check_shardable(100, 101, 8, 2)
