"""Background threads that give way to training (no TensorFlow here)."""

from __future__ import annotations

import os
import sys
import threading

#: How much lower than training a background save runs (Linux ``nice`` steps, for the
#: writing thread alone): where they compete for a core, training goes first.
BACKGROUND_NICENESS = 10


def lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: ``setpriority`` on a thread
    id affects that thread only; elsewhere it would affect the process, so nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICENESS
        )
    except OSError:  # not permitted here: the save still runs, at the usual priority
        pass
