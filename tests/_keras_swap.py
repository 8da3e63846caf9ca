"""A pytest plugin for running Keras' own callback tests against forge_dist: it puts
forge_dist's counterpart in the place of the Keras callback named by ``FORGE_SWAP``
(``keras.src.callbacks.<name>``, which Keras' tests construct), on a one-process
communicator, and counts the callbacks it made into ``FORGE_SWAP_COUNT``."""

from __future__ import annotations

import os


def pytest_configure(config):
    from keras.src import callbacks

    from forge_dist import keras as fk
    from forge_dist.comm import LocalCommunicator

    local = LocalCommunicator()
    made = []

    counterparts = {
        "BackupAndRestore": fk.BackupAndRestore,
        "ModelCheckpoint": fk.ChiefModelCheckpoint,
        "CSVLogger": fk.ChiefCSVLogger,
        "EarlyStopping": fk.SyncEarlyStopping,
        "ReduceLROnPlateau": fk.SyncReduceLROnPlateau,
        "TerminateOnNaN": fk.SyncTerminateOnNaN,
    }
    name = os.environ["FORGE_SWAP"]
    cls = counterparts[name]

    def make(*args, **kwargs):
        made.append(1)
        return cls(*args, communicator=local, **kwargs)

    setattr(callbacks, name, make)
    config._forge_swap_made = made


def pytest_unconfigure(config):
    with open(os.environ["FORGE_SWAP_COUNT"], "w") as f:
        f.write(str(len(getattr(config, "_forge_swap_made", []))))
