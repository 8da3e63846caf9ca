"""Child process for the async crash tests: trains with ChiefModelCheckpoint(async_save=
True), or with two tiers (FORGE_TEST_LOCAL_DIR: the local root, saved synchronously and
copied into the url in the background); the background thread stops at every named store
point until the parent says "go" (or SIGKILLs it there). Points are printed as
"POINT <step>:<name>", the step read from the thread's name ("forge-dist-save step N",
"forge-dist-replicate step N")."""

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
    local = os.environ.get("FORGE_TEST_LOCAL_DIR")
    if local:
        ckpt = fk.ChiefModelCheckpoint(
            url, communicator=LocalCommunicator(), local_directory=local, local_keep_last=1
        )
    else:
        ckpt = fk.ChiefModelCheckpoint(url, communicator=LocalCommunicator(), async_save=True)
    _faults.hook = hook
    model.fit(x, y, epochs=4, batch_size=16, shuffle=False, verbose=0, callbacks=[ckpt])
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
