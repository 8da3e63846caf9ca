"""Which samples each rank trains on when every rank holds the whole dataset.

An epoch's ``n`` samples are cut, in order, into global batches of ``batch_size ×
size``; rank ``r`` trains on the ``r``-th ``batch_size`` samples of each. A short last
global batch is cut into ``size`` contiguous pieces whose lengths differ by at most one,
so every rank runs the same number of steps (each step's gradient all-reduce needs every
rank) and every sample is trained on exactly once. The position inside an epoch is
therefore a global sample offset, which means the same at any number of ranks: an epoch
interrupted after ``offset`` samples continues, at any size, on ``samples[offset:]``.
"""

from __future__ import annotations

from forge_dist.errors import ConfigurationError


def _pieces(count: int, size: int) -> list[int]:
    """``count`` cut into ``size`` lengths differing by at most one, longest first."""
    base, extra = divmod(count, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def check_shardable(n: int, offset: int, batch_size: int, size: int) -> None:
    """Raise unless ``samples[offset:n]`` gives every one of ``size`` ranks at least one
    sample in every step."""
    if not 0 <= offset <= n:
        raise ConfigurationError(
            f"the checkpoint's position ({offset} samples into the epoch) lies outside "
            f"the {n} samples given: pass the dataset the run was trained on"
        )
    short = (n - offset) % (batch_size * size)
    if 0 < short < size:
        where = "the epoch" if offset == 0 else f"the epoch's rest (after sample {offset})"
        raise ConfigurationError(
            f"{where} ends in a global batch of {short} sample(s) for {size} ranks: a rank "
            "would have nothing to train on in the last step while the others wait for it "
            "in the gradient all-reduce; pick a batch size or sample count that leaves at "
            f"least {size} samples (or none) for the last step"
        )


def shard_rows(n: int, offset: int, batch_size: int, size: int, rank: int) -> list[range]:
    """The sample indices (in order) rank ``rank`` of ``size`` trains on from
    ``samples[offset:n]``, as one range per step."""
    check_shardable(n, offset, batch_size, size)
    step = batch_size * size
    rows: list[range] = []
    start = offset
    while start + step <= n:
        rows.append(range(start + rank * batch_size, start + (rank + 1) * batch_size))
        start += step
    if start < n:
        lengths = _pieces(n - start, size)
        first = start + sum(lengths[:rank])
        rows.append(range(first, first + lengths[rank]))
    return rows


def samples_done(n: int, offset: int, batch_size: int, size: int, steps: int) -> int:
    """Global samples of the epoch trained once ``steps`` steps ran from ``offset``."""
    return min(n, offset + steps * batch_size * size)
