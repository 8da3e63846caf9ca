"""A ``tf.data`` input to ``fit_resumed``: whether an interrupted epoch can be replayed
from batch N, and what to change when it cannot.

An epoch resumed mid-way must go on with the very batches it had not reached. A
pipeline that yields the same batches in the same order at every iteration (no shuffle,
or ``shuffle(..., seed=S, reshuffle_each_iteration=False)``; deterministic maps) is
replayed with ``dataset.skip(N)``. One that reshuffles each epoch draws each epoch's
order from a generator whose position a new process cannot restore, an unseeded
shuffle differs in every process, and a map with ``deterministic=False`` may reorder
elements: those are refused before the first step, naming the change. (Array inputs
need none of this: ``fit_resumed(shuffle=True)`` orders each epoch itself.)
"""

from __future__ import annotations

from typing import Any

from forge_dist.errors import ConfigurationError


def is_dataset(x: Any) -> bool:
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - the [tf] extra is what runs Keras here
        return False
    return isinstance(x, tf.data.Dataset)


def _nodes(graph: Any) -> list[Any]:
    nodes = list(graph.node)
    for fn in graph.library.function:
        nodes.extend(fn.node_def)
    return nodes


def replay_problem(dataset: Any) -> str | None:
    """Why ``dataset`` cannot be replayed to a batch of an epoch, or None."""
    import numpy as np
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(dataset._as_serialized_graph().numpy())
    nodes = _nodes(graph)
    consts = {n.name: n for n in nodes if n.op == "Const"}

    def const(name: str) -> Any:
        node = consts.get(name.split(":")[0])
        return None if node is None else tf.make_ndarray(node.attr["value"].tensor)

    for node in nodes:
        if "Shuffle" in node.op and "Dataset" in node.op:
            reshuffle = node.attr["reshuffle_each_iteration"]
            if "reshuffle_each_iteration" not in node.attr or reshuffle.b:
                return (
                    "it shuffles anew each epoch (shuffle's reshuffle_each_iteration=True, "
                    "the default): a new process cannot tell which order the interrupted "
                    "epoch had"
                )
            seeds = [const(i) for i in list(node.input)[2:4]]
            if all(s is not None and not np.any(s) for s in seeds):
                return "its shuffle has no seed: every process shuffles differently"
        deterministic = node.attr["deterministic"].s if "deterministic" in node.attr else b""
        if deterministic == b"false":
            return (
                f"{node.op} runs with deterministic=False: its elements may come in another order"
            )
    if dataset.options().deterministic is False:
        return "its options say deterministic=False: elements may come in another order"
    return None


def check_replayable(dataset: Any, step: int) -> None:
    """Refuse, before the first step, to continue mid-epoch on a pipeline that cannot be
    replayed, naming what to change."""
    why = replay_problem(dataset)
    if why is None:
        return
    raise ConfigurationError(
        f"step {step} was saved mid-epoch, and this tf.data pipeline cannot be replayed to "
        f"that batch: {why}. Pass the arrays to fit_resumed (its shuffle=True orders each "
        "epoch from a recorded seed), or shuffle the dataset with a seed and "
        "reshuffle_each_iteration=False and keep maps deterministic, or resume from a "
        "checkpoint taken at an epoch end (restore_latest(..., epoch_end_only=True))"
    )


# ------------------------------------------------------- shard=True: one global stream
def check_same_stream(dataset: Any) -> None:
    """``fit_resumed(shard=True)`` on a pipeline: every rank must read the same samples
    in the same order, so an unseeded shuffle or a non-deterministic map is refused at
    the start (a seeded shuffle that reshuffles each epoch gives every rank the same
    orders; only a mid-epoch resume needs ``reshuffle_each_iteration=False``)."""
    why = replay_problem(dataset)
    if why is None or "shuffles anew each epoch" in why:
        return
    raise ConfigurationError(
        f"shard=True reads one stream of samples, the same on every rank, and this "
        f"tf.data pipeline gives each process its own: {why}. Seed its shuffle and keep "
        "its maps deterministic, or leave shard= out (each rank its own shard)"
    )


def count_samples(samples: Any) -> int:
    """How many samples one epoch of ``samples`` (an unbatched pipeline) holds: its
    cardinality where TensorFlow knows it, else one pass over it (at the fit's start)."""
    import tensorflow as tf

    known = int(samples.cardinality())
    if known == int(tf.data.INFINITE_CARDINALITY):
        raise ConfigurationError(
            "shard=True needs a finite tf.data pipeline (one epoch's samples, cut into "
            "global batches); this one repeats forever"
        )
    if known >= 0:
        return known
    return int(samples.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))


def stream_digest(samples: Any, n: int) -> str:
    """A digest of the stream: its length, element spec and first 64 samples."""
    import hashlib

    import tensorflow as tf

    digest = hashlib.sha256(repr((n, samples.element_spec)).encode())
    for element in samples.take(64):
        for leaf in tf.nest.flatten(element):
            digest.update(leaf.numpy().tobytes())
    return digest.hexdigest()


def rank_batches(samples: Any, n: int, offset: int, batch_size: int, rank: int, size: int) -> Any:
    """Rank ``rank``'s batches of ``samples[offset:n]``: the stream cut in order into
    global batches of ``batch_size × size``, this rank's part of each as
    :func:`forge_dist.policy.shard_rows` lays it out (a short last global batch in
    ``size`` contiguous pieces, the first ``rest % size`` one longer)."""
    import tensorflow as tf

    def part(*batch: Any) -> Any:
        m = tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]
        base, extra = m // size, m % size
        start = rank * base + tf.minimum(tf.constant(rank, tf.int64), extra)
        length = base + tf.cast(rank < extra, tf.int64)
        cut = tf.nest.map_structure(lambda t: t[start : start + length], batch)
        return cut if len(cut) > 1 else cut[0]

    steps = -(-max(n - offset, 0) // (batch_size * size))
    batches = samples.skip(offset).batch(batch_size * size).map(part)
    return batches.apply(tf.data.experimental.assert_cardinality(steps))  # (Keras' steps)
