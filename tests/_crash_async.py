"""Child process for the async crash test: trains with ChiefModelCheckpoint(async_save=
True); the background writer stops at every named store point until the parent says
"go" (or SIGKILLs it there). Points are printed as "POINT <step>:<name>", the step read
from the writer thread's name ("forge-dist-save step N")."""

import os
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from forge_dist import keras as fk  # noqa: E402
from forge_dist.comm import LocalCommunicator  # noqa: E402
from forge_dist.storage import _faults  # noqa: E402


def hook(name: str) -> None:
    thread = threading.current_thread()
    if thread is threading.main_thread():
        return
    print(f"POINT {thread.name.rsplit(' ', 1)[-1]}:{name}", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("parent went away")


def main() -> None:
    url = sys.argv[1]
    x = np.random.default_rng(0).normal(size=(128, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    ckpt = fk.ChiefModelCheckpoint(url, communicator=LocalCommunicator(), async_save=True)
    _faults.hook = hook
    model.fit(x, y, epochs=4, batch_size=16, shuffle=False, verbose=0, callbacks=[ckpt])
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
