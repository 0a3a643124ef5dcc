"""Reading the launch environment: torchrun and MPI names, validated before any network call."""

from __future__ import annotations

import pytest

from hasten.utils.process_env import LaunchEnvironment


def test_no_launcher_is_a_single_process() -> None:
    launch = LaunchEnvironment.from_environ({})
    assert launch == LaunchEnvironment()
    assert not launch.is_distributed and not launch.launched


def test_torchrun_variables() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    launch = LaunchEnvironment.from_environ(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (3, 4, 1, 2)
    assert launch.init_method == "tcp://10.0.0.1:29500"
    assert launch.is_distributed and launch.launched


@pytest.mark.parametrize(
    "env",
    [
        {
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        },
        {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
        {
            "MV2_COMM_WORLD_RANK": "1",
            "MV2_COMM_WORLD_SIZE": "2",
            "MV2_COMM_WORLD_LOCAL_RANK": "1",
            "MV2_COMM_WORLD_LOCAL_SIZE": "2",
        },
    ],
    ids=["openmpi", "mpich", "mvapich"],
)
def test_mpi_variables(env: dict[str, str]) -> None:
    launch = LaunchEnvironment.from_environ(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (1, 2, 1, 2)


def test_ipv6_address() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "::1", "MASTER_PORT": "1234"}
    assert LaunchEnvironment.from_environ(env).init_method == "tcp://[::1]:1234"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"RANK": "2", "WORLD_SIZE": "2"},
            r"RANK=2 is not a valid rank in a world of 2 processes \(ranks run from 0 to 1\)",
        ),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, r"RANK=-1 is not a valid rank"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be at least 1"),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, r"RANK='zero' must be an integer"),
        ({"RANK": "0"}, r"RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, r"WORLD_SIZE is set but RANK is not"),
        (
            {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "8"},
            r"LOCAL_WORLD_SIZE=8 must be between 1 and the world size 4",
        ),
        (
            {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
            r"LOCAL_RANK=2 is not a valid local rank on a node of 2",
        ),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"},
            r"MASTER_PORT='http' must be a port number",
        ),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is outside the range"),
    ],
)
def test_inconsistent_environments_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LaunchEnvironment.from_environ(env)


def test_missing_address_is_explained() -> None:
    launch = LaunchEnvironment.from_environ({"RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(
        ValueError, match=r"Rank 1 of 2 has no rendezvous address: set MASTER_ADDR and MASTER_PORT"
    ):
        launch.init_method
