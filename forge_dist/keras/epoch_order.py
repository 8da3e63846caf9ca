"""``fit_resumed(shuffle=True)``: every epoch in its own random order, the same order
again after a resume.

Keras shuffles array inputs with an unseeded generator: an interrupted epoch cannot be
continued on the samples it had not reached, because nobody knows which those were. Here
each epoch's order is a stateless function of a seed and the epoch (TensorFlow's
``stateless_shuffle``), and the seed, chosen once by the chief at a fresh start, is
recorded in every checkpoint (``state.data_seed``). The epochs after a resume are fed as
one ``tf.data`` pipeline that gathers each epoch's batches in that order (one ``fit``:
the callbacks see one training, as with Keras' own shuffling); the rest of an
interrupted epoch is the samples of its order it had not reached.

With ``shard=True`` the order is the whole dataset's (the same on every rank) and each
rank takes its part of each global batch (:mod:`forge_dist.policy.shards`), so a
position is a global sample offset in that order, valid at any number of ranks.
Without it, each rank orders its own samples (its rank is part of the seed).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from forge_dist import policy

_MIX = 1_000_003  # spreads the ranks' seeds apart


def new_seed(comm: Any) -> int:
    """A seed for a fresh run: the chief's, on every rank. It comes from NumPy's global
    generator, so ``keras.utils.set_random_seed(s)`` makes the epochs' order repeatable,
    as it does Keras' own shuffling."""
    seed = int(np.random.randint(0, 2**31 - 1))
    if comm is None or comm.size <= 1:
        return seed
    return int(comm.broadcast(seed if comm.is_chief else None, name="fit_resumed(data seed)"))


class EpochOrder:
    """The order of this rank's samples in each epoch."""

    def __init__(self, seed: int, n: int, rank: int = 0, shard: Any = None) -> None:
        self.seed, self.n, self.rank, self.shard = int(seed), int(n), rank, shard

    def _seed(self) -> int:
        return self.seed if self.shard is not None else (self.seed + _MIX * self.rank) % 2**31

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the samples (of the whole dataset when sharded)."""
        import tensorflow as tf

        return _permute(tf, self.n, self._seed(), epoch).numpy()

    def rows(self, epoch: int, offset: int, batch_size: int) -> np.ndarray:
        """The samples this rank trains on in ``epoch`` from position ``offset`` on: a
        global sample offset when sharded, else a position in this rank's own order."""
        perm = self.permutation(epoch)
        if self.shard is None:
            return perm[offset:]
        _, size = self.shard
        ranges = policy.shard_rows(self.n, offset, batch_size, size, self.rank)
        return perm[np.concatenate([np.arange(r.start, r.stop) for r in ranges])]

    def dataset(
        self, arrays: Any, first_epoch: int, epochs: int, batch_size: int
    ) -> tuple[Any, int]:
        """``(dataset, steps_per_epoch)``: epochs ``first_epoch..epochs-1``, each in its
        order, as batches of ``arrays`` (a structure of arrays of ``n`` samples)."""
        import tensorflow as tf

        positions = None
        count = self.n
        if self.shard is not None:
            _, size = self.shard
            ranges = policy.shard_rows(self.n, 0, batch_size, size, self.rank)
            positions = tf.constant(np.concatenate([np.arange(r.start, r.stop) for r in ranges]))
            count = int(positions.shape[0])
        data = tf.nest.map_structure(tf.convert_to_tensor, arrays)
        n, seed = self.n, self._seed()

        def epoch_batches(epoch: Any) -> Any:
            order = _permute(tf, n, seed, epoch)
            if positions is not None:
                order = tf.gather(order, positions)
            return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

        ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_batches)
        ds = ds.map(lambda idx: tf.nest.map_structure(lambda a: tf.gather(a, idx), data))
        return ds.prefetch(2), math.ceil(count / batch_size)


def _permute(tf: Any, n: int, seed: int, epoch: Any) -> Any:
    seeds = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=seeds)
