"""What a checkpoint of a 50 M parameter model costs training, measured the interleaved way.

    python benchmarks/bench_save.py [--rounds 9] [--steps 3] [--block-epochs 2] [--params-m 50]
                                    [--no-orbax]

One ``fit`` of the model of FACTS-sized scale (Adam: a 605 MB ``.keras``), random data,
TensorFlow at one thread (so one host core is free for a writer, as when an accelerator
computes). The epochs are grouped in blocks; blocks that begin with a save alternate with
clean blocks, and the savers take turns within the same fit:

    [keras save] [clean] [sync save] [clean] [async save] [clean] [keras save] ...

For each saver and save:

- **held**: how long the callback held the loop at the save point (the save of the
  epoch before the block, made as the block begins);
- **lost**: the save block's time minus the mean of the clean blocks on either side of
  it: the held time *plus* whatever the save slowed in the block's epochs, the ones
  right after it (a background write competing with training, the first steps after a
  snapshot). A background save still running at its block's end is waited for there,
  and that wait counts too.

Between blocks, untimed, every dirty page is written out (``os.sync``): a save that
leaves its file to the kernel's writeback (plain Keras, which does not fsync) would
otherwise slow whichever later block the writeback lands in, a clean one or another
saver's. That writeback is not charged to anyone (plain Keras' figure is, if anything,
low).

The fit reads its batches from a ``tf.data`` pipeline with autotuning off. With it on
(what ``fit`` on NumPy arrays builds), tf.data's autotuning thread sits in a timed wait,
and the next epoch's start waits for it to wake when it tears the last epoch's iterator
down (TensorFlow 2.21: ``~RootDataset::Iterator`` waiting on ``Model::OptimizeLoop``,
seen with gdb). After a callback held the loop a while, that wait measured 9-16 s
with both cores idle, in whichever block came next: in one run it added ~11 s to 4 of
5 sync-save blocks at 201 M, whose steps and save were as fast as in the others. The
pause is TensorFlow's, after any long callback, not a checkpoint's.

Medians over the rounds after the first (which warms up: the first save of each kind
faults in its buffers). Baseline: plain Keras ``ModelCheckpoint`` in the same fit.
Where ``orbax-checkpoint`` is installed, Keras' own asynchronous checkpointing
(``keras.callbacks.OrbaxCheckpoint(save_on_background=True)``) takes a turn too.

Writes benchmarks/out/save.json (``save-200m.json`` for ``--params-m 200``, …).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from _out import sized, write_result


def limit_threads() -> None:
    """TensorFlow at one thread, and its BFC allocator on the CPU (before it starts).

    TensorFlow's default CPU allocator hands each large tensor back to the kernel when
    it is freed, so every step faults its gradients' pages in afresh. At 201 M parameters
    that made steps take 7 s, half of it in the kernel, and clean blocks of the same
    steps differed by more than a save costs. The BFC allocator keeps freed memory for the
    next step (3.6-3.9 s a step, measured A/B in fresh processes). Every saver in the fit
    shares it, so the ratios stay fair; ``TF_CPU_ALLOCATOR_USE_BFC=false`` turns it off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def big_model(params_m: float = 50, widths: tuple[int, int, int] = (2048, 8192, 4096)):
    """About ``params_m`` M parameters, Adam: 50.4 M (a 605 MB ``.keras``) and 16.8 M
    more for each further 4096-unit layer (200 M: 201.4 M, 2.4 GB; 400 M: 403 M, 4.8 GB).
    ``widths``: the input's and the first two layers' (``(1024, 4096, 2048)`` with
    ``params_m=0``: 12.6 M, 151 MB)."""
    from forge_dist.keras import _compat

    keras = _compat.keras
    keras.utils.set_random_seed(0)
    more = max(0, round((params_m - 50.4) / 16.78))
    model = keras.Sequential(
        [
            keras.Input((widths[0],)),
            keras.layers.Dense(widths[1]),
            keras.layers.Dense(widths[2]),
            *[keras.layers.Dense(4096) for _ in range(more)],
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def batches(x, y, batch_size: int = 8):
    """``x``, ``y`` in batches, in order, from a ``tf.data`` pipeline with autotuning
    off (see the module's docstring)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).with_options(options)


def savers(root: str, orbax: bool = True) -> dict:
    from forge_dist.comm import LocalCommunicator
    from forge_dist.keras import ChiefModelCheckpoint, _compat

    keras = _compat.keras
    local = LocalCommunicator()
    out = {
        "keras": keras.callbacks.ModelCheckpoint(os.path.join(root, "keras.keras")),
        "sync": ChiefModelCheckpoint(os.path.join(root, "sync"), communicator=local, keep_last=1),
        "async": ChiefModelCheckpoint(
            os.path.join(root, "async"), communicator=local, keep_last=1, async_save=True
        ),
    }
    orbax = getattr(keras.callbacks, "OrbaxCheckpoint", None) if orbax else None
    if orbax is not None:
        try:
            out["orbax"] = orbax(
                os.path.join(root, "orbax"), save_on_background=True, max_to_keep=1
            )
        except Exception as e:  # orbax-checkpoint (and JAX) not installed
            print(f"   (no OrbaxCheckpoint row: {type(e).__name__}: {str(e)[:120]})")
    return out


def interleaved(inner: dict, block_epochs: int):
    """The callback that runs the schedule: which block saves with which saver, the
    block times, the held times."""
    from forge_dist.keras import _compat

    kinds = list(inner)

    class Interleave(_compat.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.blocks: list[tuple[str | None, float, float]] = []  # kind, time, held
            self._t0 = 0.0
            self._held = 0.0
            self._logs: dict = {}

        def kind_of(self, epoch: int) -> str | None:
            block = epoch // block_epochs
            return None if block % 2 else kinds[(block // 2) % len(kinds)]

        def set_model(self, model) -> None:
            super().set_model(model)
            for cb in inner.values():
                cb.set_model(model)

        def on_train_begin(self, logs=None) -> None:
            for cb in inner.values():
                cb.on_train_begin(logs)

        def on_epoch_begin(self, epoch, logs=None) -> None:
            if epoch % block_epochs == 0:
                self._t0, self._held = time.perf_counter(), 0.0
                kind = self.kind_of(epoch)
                if kind is not None and epoch > 0:
                    # The save of the epoch just ended, made here so that the block holds
                    # it and the block's epochs are the ones after it.
                    inner[kind].on_epoch_end(epoch - 1, self._logs)
                    self._held = time.perf_counter() - self._t0

        def on_epoch_end(self, epoch, logs=None) -> None:
            kind = self.kind_of(epoch)
            self._logs = dict(logs or {})
            if epoch % block_epochs == block_epochs - 1:
                if kind is not None:
                    finish(inner[kind])  # a save still running is charged to its block
                self.blocks.append((kind, time.perf_counter() - self._t0, self._held))
                os.sync()  # untimed: no saver's dirty pages are written back in a later block

        def on_train_end(self, logs=None) -> None:
            for cb in inner.values():
                cb.on_train_end(logs)

    return Interleave()


def finish(cb) -> None:
    """Wait for a saver's background work, if it has any."""
    checkpointer = getattr(cb, "async_checkpointer", None)
    if checkpointer is not None:
        checkpointer.wait_until_finished()
        checkpointer.check_for_errors()
    replicator = getattr(cb, "replicator", None)  # two tiers: the copy to the durable root
    if replicator is not None:
        replicator.wait()
    wait = getattr(cb, "wait_until_finished", None) or getattr(
        getattr(cb, "checkpointer", None), "wait_until_finished", None
    )
    if callable(wait):
        wait()


def costs(blocks: list, kinds: list[str], warmup_rounds: int = 1) -> dict:
    """Per kind: held and lost per save (medians after the warm-up rounds)."""
    per_round = 2 * len(kinds)
    held: dict[str, list[float]] = {k: [] for k in kinds}
    lost: dict[str, list[float]] = {k: [] for k in kinds}
    for i, (kind, t, h) in enumerate(blocks):
        if kind is None or i < warmup_rounds * per_round:
            continue
        clean = [blocks[j][1] for j in (i - 1, i + 1) if 0 <= j < len(blocks)]
        held[kind].append(h)
        lost[kind].append(t - statistics.mean(clean))
    clean_blocks = [t for k, t, _ in blocks[warmup_rounds * per_round :] if k is None]
    return {
        "held": {k: statistics.median(v) for k, v in held.items()},
        "lost": {k: statistics.median(v) for k, v in lost.items()},
        "held_all": held,
        "lost_all": lost,
        "clean_block_s": statistics.median(clean_blocks),
    }


def run(
    rounds: int,
    steps: int,
    block_epochs: int,
    params_m: float = 50,
    *,
    scope=None,
    widths: tuple[int, int, int] = (2048, 8192, 4096),
    one_thread: bool = True,
    orbax: bool = True,
) -> dict:
    """``scope``: makes the context the model is built in (a ``tf.distribute``
    strategy's ``scope``, for device-resident variables); ``one_thread=False`` leaves
    TensorFlow's threads alone (it cannot change them once it has started);
    ``orbax=False`` leaves Keras' OrbaxCheckpoint out."""
    if one_thread:
        limit_threads()
    import contextlib
    import resource

    import numpy as np

    from forge_dist.keras.preflight import state_bytes

    with scope() if scope else contextlib.nullcontext():
        model = big_model(params_m, widths)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * steps, widths[0])).astype("float32")
    y = rng.normal(size=(8 * steps, 10)).astype("float32")
    root = tempfile.mkdtemp(prefix="forge-bench-save-")
    try:
        inner = savers(root, orbax)
        kinds = list(inner)
        cb = interleaved(inner, block_epochs)
        epochs = rounds * 2 * len(kinds) * block_epochs
        model.fit(batches(x, y), epochs=epochs, verbose=0, shuffle=False, callbacks=[cb])
        size = os.path.getsize(os.path.join(root, "keras.keras"))
        host_bytes = inner["async"]._staged.host_bytes  # the snapshot's host buffers
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = costs(cb.blocks, kinds)
    k = out["held"]["keras"], out["lost"]["keras"]
    out.update(
        params=int(model.count_params()),
        file_mb=size / 1e6,
        # Host memory: the async save's buffers (allocated at its first save, kept), what
        # the check at train begin asks of MemAvailable, and the process' peak RSS.
        async_host_mb=host_bytes / 1e6,
        state_mb=state_bytes(model) / 1e6,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        kinds=kinds,
        rounds=rounds,
        steps_per_epoch=steps,
        block_epochs=block_epochs,
        blocks=cb.blocks,
        ratio_held={kind: out["held"][kind] / k[0] for kind in kinds},
        ratio_lost={kind: out["lost"][kind] / k[1] for kind in kinds},
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9, help="the first one warms up")
    ap.add_argument(
        "--steps",
        type=int,
        default=3,
        help="steps an epoch (a block's noise grows with its length: 3 keep it near 5 s at 50 M)",
    )
    ap.add_argument("--block-epochs", type=int, default=2)
    ap.add_argument(
        "--params-m", type=float, default=50, help="model size, M parameters (50, 200, 400)"
    )
    ap.add_argument(
        "--no-orbax", action="store_true", help="leave Keras' OrbaxCheckpoint out (shorter)"
    )
    args = ap.parse_args()
    res = run(args.rounds, args.steps, args.block_epochs, args.params_m, orbax=not args.no_orbax)
    print(
        f"checkpoint of the {res['params'] / 1e6:.0f} M-param model ({res['file_mb']:.0f} MB), "
        f"TF at 1 thread, a clean block of {args.block_epochs} x {args.steps} steps takes "
        f"{res['clean_block_s']:.2f} s:"
    )
    for kind in res["kinds"]:
        print(
            f"   {kind:>6}: held {res['held'][kind]:.3f} s ({res['ratio_held'][kind]:.3f}x), "
            f"lost in all {res['lost'][kind]:.3f} s ({res['ratio_lost'][kind]:.3f}x Keras)"
        )
    print(
        f"   host memory: the async buffers {res['async_host_mb']:.0f} MB (model and optimizer "
        f"state {res['state_mb']:.0f} MB), peak RSS {res['peak_rss_mb']:.0f} MB"
    )
    write_result(sized("save", args.params_m), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
