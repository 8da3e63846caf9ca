"""How per-rank metric values become one value every rank agrees on."""

from __future__ import annotations

from collections.abc import Sequence


def mean_over_ranks(
    rows: Sequence[Sequence[float]], weights: Sequence[float | None] | None = None
) -> tuple[list[float], list[float]]:
    """``(plain, weighted)`` column means of one row of values per rank, in rank order.

    ``weighted`` weighs each rank's row by its weight (e.g. its number of validation
    samples) when every rank gave one and they sum to more than zero; otherwise it is
    the plain mean. Every rank computes this from the same gathered rows in the same
    order, so every rank gets bit-identical results.
    """
    n = len(rows)
    if n == 0:
        return [], []
    width = len(rows[0])
    plain = [_ordered_sum(row[i] for row in rows) / n for i in range(width)]
    ws = list(weights) if weights is not None else [None] * n
    if any(w is None for w in ws) or _ordered_sum(float(w) for w in ws if w is not None) <= 0:
        return plain, list(plain)
    total = _ordered_sum(float(w) for w in ws if w is not None)
    weighted = [
        _ordered_sum(row[i] * float(w) for row, w in zip(rows, ws, strict=True) if w is not None)
        / total
        for i in range(width)
    ]
    return plain, weighted


def _ordered_sum(values: object) -> float:
    total = 0.0
    for v in values:  # type: ignore[attr-defined]
        total += float(v)
    return total
