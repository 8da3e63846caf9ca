"""forge_dist._launch: rank and size from the launcher's environment, in one place."""

from __future__ import annotations

import pytest

from forge_dist._launch import Launch, launch_environment


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, Launch(None, 0, 1)),
        ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"}, Launch("horovodrun", 1, 2, "HOROVOD_SIZE")),
        (
            {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"},
            Launch("mpi", 3, 4, "OMPI_COMM_WORLD_SIZE"),
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, Launch("mpi", 1, 2, "PMI_SIZE")),
        ({"PMIX_RANK": "1", "PMIX_SIZE": "2"}, Launch("mpi", 1, 2, "PMIX_SIZE")),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, Launch("slurm", 1, 2, "SLURM_NTASKS")),
        # An allocation without a task: not a rank of anything.
        ({"SLURM_NTASKS": "2"}, Launch(None, 0, 1)),
        # mpirun inside an sbatch allocation: the MPI world wins over SLURM's.
        (
            {
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_SIZE": "2",
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "2",
            },
            Launch("mpi", 1, 2, "OMPI_COMM_WORLD_SIZE"),
        ),
        # An MPI singleton under srun: SLURM's world of 2 is what the launcher meant.
        (
            {"OMPI_COMM_WORLD_SIZE": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
            Launch("slurm", 1, 2, "SLURM_NTASKS"),
        ),
        ({"OMPI_COMM_WORLD_SIZE": "x"}, Launch(None, 0, 1)),
    ],
)
def test_launch_environment(env, expected):
    assert launch_environment(env) == expected


def test_the_store_records_the_launchers_rank(tmp_path, monkeypatch):
    from forge_dist.storage import CheckpointStore

    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "3")
    for var in ("HOROVOD_RANK", "HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    store = CheckpointStore(str(tmp_path / "r"))
    with store.writer(1) as w:
        w.add_bytes("a", b"a")
    writer = store.get(1).manifest.writer
    assert (writer["rank"], writer["world_size"]) == (1, 3)
