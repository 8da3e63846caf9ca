"""A short check on a GPU machine: the save and resume paths with device-resident variables.

    make gpu-check      # python benchmarks/gpu_check.py [--params-m 50] [--rounds 3]

``tf.distribute.MirroredStrategy`` over the visible GPUs, in one process:

1. **demo**: ``production_callbacks`` on a small regression task, 3 epochs, then a fresh
   model built under the strategy and ``restore_latest``: its weights and optimizer
   state must equal the trained model's, bit for bit;
2. **save**: ``benchmarks/bench_save.py``'s interleaved fit with the model built under the
   strategy (its variables on the devices): held and lost per save against plain Keras
   ``ModelCheckpoint`` in the same fit; the held time includes the device-to-host copy;
3. **resume**: ``benchmarks/bench_resume.py``'s local kinds under the strategy: build +
   verified ``restore_latest`` against ``keras.models.load_model``, cold cache.

A few minutes at the default size. Writes benchmarks/out/gpu.json and a short report,
benchmarks/out/gpu.md. Without a GPU it stops (exit 2), unless ``--cpu-devices N`` asks
for N logical CPU devices instead: a dry run of this script, as the test suite makes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: A tiny model for --cpu-devices dry runs: (input, first, second) widths.
TINY = (64, 128, 64)


def devices(cpu_devices: int) -> list[str]:
    """The strategy's devices: every GPU, else ``cpu_devices`` logical CPUs, else []."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return [f"/gpu:{i}" for i in range(len(gpus))]
    if cpu_devices <= 0:
        return []
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices
    )
    return [f"/cpu:{i}" for i in range(cpu_devices)]


def demo(strategy) -> dict:
    """Train with the production stack, restore into a fresh model: equal, bit for bit."""
    import numpy as np

    from forge_dist import keras as fk
    from forge_dist.comm import LocalCommunicator
    from forge_dist.keras import _compat

    keras = _compat.keras
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = np.tanh(x @ np.linspace(-1, 1, 8).astype("float32")[:, None])
    comm = LocalCommunicator()  # one process; the strategy spreads it over the devices

    def make():
        with strategy.scope():
            model = keras.Sequential(
                [
                    keras.Input((8,)),
                    keras.layers.Dense(32, activation="tanh"),
                    keras.layers.Dense(1),
                ]
            )
            model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return model

    with tempfile.TemporaryDirectory(prefix="forge-gpu-check-") as root:
        keras.utils.set_random_seed(7)
        model = make()
        with strategy.scope():
            callbacks = fk.production_callbacks(  # the last epoch's weights stay (no best)
                root, patience=5, restore_best_weights=False, communicator=comm, verbose=0
            )
        t0 = time.perf_counter()
        model.fit(
            x, y, validation_split=0.25, epochs=3, batch_size=64, verbose=0, callbacks=callbacks
        )
        fit_s = time.perf_counter() - t0
        fresh = make()
        with strategy.scope():
            got = fk.restore_latest(fresh, root, communicator=comm, verbose=0)
        same = all(
            np.array_equal(a, b)
            for a, b in zip(model.get_weights(), fresh.get_weights(), strict=True)
        )
        opt = [np.asarray(v) for v in _compat.optimizer_variables(model.optimizer)]
        opt_fresh = [np.asarray(v) for v in _compat.optimizer_variables(fresh.optimizer)]
        same_opt = len(opt) == len(opt_fresh) and all(
            np.array_equal(a, b) for a, b in zip(opt, opt_fresh, strict=True)
        )
    return {
        "fit_s": fit_s,
        "restored_step": got.step,
        "weights_equal": same,
        "optimizer_equal": same_opt,
        "ok": bool(got.restored and same and same_opt),
    }


def report(res: dict) -> str:
    d, s, r = res["demo"], res["save"], res["resume"]
    size = f"{s['params'] / 1e6:.1f} M params ({s['file_mb']:.1f} MB)"
    lines = [
        "# forge_dist GPU check",
        "",
        f"{res['date']}, {res['machine']}; `MirroredStrategy` over {', '.join(res['devices'])} "
        f"({res['device_names']}), TensorFlow {res['tensorflow']}.",
        "",
        f"- demo: `production_callbacks`, 3 epochs, restored from step {d['restored_step']}: "
        f"weights {'equal' if d['weights_equal'] else 'DIFFER'}, optimizer state "
        f"{'equal' if d['optimizer_equal'] else 'DIFFERS'}, bit for bit.",
        "",
        "| measurement, " + size + " | ours | plain Keras | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    names = {"sync": "`ChiefModelCheckpoint`", "async": "`ChiefModelCheckpoint(async_save=True)`"}
    for kind, name in names.items():
        for what in ("held", "lost"):
            lines.append(
                f"| {name}: {what} per save (device-to-host copy included) | "
                f"{s[what][kind]:.3f} s | {s[what]['keras']:.3f} s | "
                f"**{s['ratio_' + what][kind]:.2f}×** |"
            )
    t = r["seconds"]
    lines.append(
        "| build + verified `restore_latest`, cold cache, against `load_model` | "
        f"{t['forge']['median']:.2f} s | {t['keras']['median']:.2f} s | "
        f"**{r['ratios']['forge_vs_keras_load']:.2f}×** |"
    )
    lines += [
        "",
        f"Async host memory: {s['async_host_mb']:.1f} MB (the snapshot's buffers). Rounds: "
        f"{res['rounds']} (medians after the first).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-m", type=float, default=50, help="model size, M parameters")
    ap.add_argument("--rounds", type=int, default=3, help="the first one warms up")
    ap.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="without a GPU: N logical CPU devices and a tiny model (a dry run)",
    )
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, HERE)
    import bench_resume
    import bench_save
    import tensorflow as tf
    from _out import write_result

    found = devices(args.cpu_devices)
    if not found:
        print(
            "gpu-check: TensorFlow sees no GPU here, so there is nothing to check "
            "(pass --cpu-devices 2 for a dry run on CPU)",
            file=sys.stderr,
        )
        return 2
    on_gpu = found[0].startswith("/gpu")
    widths = (2048, 8192, 4096) if on_gpu else TINY
    strategy = tf.distribute.MirroredStrategy(found)
    names = (
        ", ".join(
            tf.config.experimental.get_device_details(g).get("device_name", "GPU")
            for g in tf.config.list_physical_devices("GPU")
        )
        or "logical CPU devices"
    )
    print(f"gpu-check: MirroredStrategy over {', '.join(found)} ({names})", flush=True)
    res: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "devices": found,
        "device_names": names,
        "tensorflow": tf.__version__,
        "rounds": args.rounds,
    }
    res["demo"] = demo(strategy)
    print(f"   demo: {'ok' if res['demo']['ok'] else 'FAILED'}", flush=True)
    res["save"] = bench_save.run(
        args.rounds,
        10 if on_gpu else 2,
        2 if on_gpu else 1,
        args.params_m if on_gpu else 0,
        scope=strategy.scope,
        widths=widths,
        one_thread=False,
        orbax=False,
    )
    print(f"   save: async lost {res['save']['ratio_lost']['async']:.2f}x Keras", flush=True)
    res["resume"] = bench_resume.run(
        args.rounds, args.params_m if on_gpu else 0, False, scope=strategy.scope, widths=widths
    )
    print(f"   resume: {res['resume']['ratios']['forge_vs_keras_load']:.2f}x load_model")
    write_result("gpu", res, args.out_dir)
    with open(os.path.join(args.out_dir, "gpu.md"), "w") as f:
        f.write(report(res))
    print(f"wrote gpu.json and gpu.md in {args.out_dir}")
    return 0 if res["demo"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
