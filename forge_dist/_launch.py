"""What the launcher says about this process: its rank and the job's size, read from the
environment that ``mpirun``, ``horovodrun``, ``srun`` or Hydra set (no heavy imports).

The one place that knows these variables: the communicators' auto-detection and the
store's default writer record both ask here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

#: (launcher, rank variable, size variable), in the order they are believed.
_LAUNCHERS = (
    ("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("mpi", "PMI_RANK", "PMI_SIZE"),  # MPICH / Intel MPI (Hydra)
    ("mpi", "PMIX_RANK", "PMIX_SIZE"),  # PMIx launchers
    ("mpi", "", "MPI_LOCALNRANKS"),  # MPICH's local count: a size, no rank
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS"),  # one srun/sbatch step
)


@dataclass(frozen=True)
class Launch:
    """``launcher`` is ``"horovodrun"``, ``"mpi"``, ``"slurm"`` or None (started alone);
    ``variable`` names what said so."""

    launcher: str | None
    rank: int
    size: int
    variable: str = ""


def _int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "") if name else ""
    return int(text) if text.strip().isdigit() else None


def launch_environment(env: Mapping[str, str] | None = None) -> Launch:
    """The first launcher whose size variable is set (a world of one counts only when
    nothing else is set)."""
    env = os.environ if env is None else env
    found: Launch | None = None
    for launcher, rank_var, size_var in _LAUNCHERS:
        size = _int(env, size_var)
        if size is None:
            continue
        if launcher in ("horovodrun", "slurm") and rank_var not in env:
            continue  # e.g. SLURM_NTASKS alone: an allocation, not a task of a step
        here = Launch(launcher, _int(env, rank_var) or 0, size, size_var)
        if size > 1 or launcher == "horovodrun":
            return here
        found = found or here
    return found or Launch(None, 0, 1)


def restarts(env: Mapping[str, str] | None = None) -> int:
    """How often the scheduler has restarted this job (SLURM's ``SLURM_RESTART_COUNT``
    after a requeue); 0 for a first start."""
    env = os.environ if env is None else env
    return _int(env, "SLURM_RESTART_COUNT") or 0


def fresh_start_allowed(env: Mapping[str, str] | None = None) -> bool:
    """``FORGE_DIST_ALLOW_FRESH_START=1``: a restarted job that finds no checkpoint may
    start over (see :func:`forge_dist.keras.restore_latest`)."""
    env = os.environ if env is None else env
    return env.get("FORGE_DIST_ALLOW_FRESH_START", "").strip().lower() in ("1", "true", "yes")


#: Filesystems whose contents live on one node: a requeued job on another node does not
#: see what the first attempt wrote there.
NODE_LOCAL_FS = frozenset(
    {"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "overlay", "vfat"}
)


def mount_of(path: str, mounts: str | None = None) -> tuple[str, str] | None:
    """``(filesystem type, mount point)`` of the mount that holds ``path`` (which need not
    exist), from ``/proc/self/mounts`` (or the text ``mounts``); None where unknown."""
    if mounts is None:
        try:
            with open("/proc/self/mounts") as f:
                mounts = f.read()
        except OSError:
            return None
    path = os.path.abspath(path)
    best: tuple[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[1])):
            best = (fields[2], point)
    return best
