"""A pure reader of the environment a launcher leaves for each process.

torchrun (and ``hasten launch``) set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; MPI launchers set
their own names (Open MPI, MPICH/PMI, MVAPICH, Intel MPI). This module reads
whichever is present into a frozen :class:`LaunchEnvironment` and validates it
before any network call. It never writes ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from hasten.utils.environment import int_variables

_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
_LOCAL_WORLD_SIZE = (
    "LOCAL_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
)


def _attempt(env: Mapping[str, str]) -> int | None:
    if not env.get("TORCHELASTIC_RUN_ID"):
        return None
    found = next(int_variables(("TORCHELASTIC_RESTART_COUNT",), env), None)
    return 0 if found is None else found[1]


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where this process sits in a launch: its ranks and the rendezvous address.

    A process started without any launcher variables is rank 0 of a world of 1.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launched: bool = False
    """Whether a launcher set the rank variables (even for a world of one process)."""
    elastic_attempt: int | None = None
    """Set when torchrun's elastic agent started this process: which attempt this is (0, then 1
    after a restart, ...). The agent's store outlives attempts, so the group's keys are kept
    apart per attempt."""

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def init_method(self) -> str:
        """The ``tcp://`` address every rank uses to rendezvous."""
        if self.master_addr is None or self.master_port is None:
            raise ValueError(
                f"Rank {self.rank} of {self.world_size} has no rendezvous address: set MASTER_ADDR and "
                "MASTER_PORT (torchrun and `hasten launch` set them for you)."
            )
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> LaunchEnvironment:
        """Read and validate the launch variables from ``env`` (``os.environ`` by default).

        Raises:
            ValueError: a variable is not an integer, or the values contradict each other
                (for instance ``RANK`` not below ``WORLD_SIZE``), naming the variables.
        """
        env = os.environ if env is None else env
        rank = next(int_variables(_RANK, env), None)
        world = next(int_variables(_WORLD_SIZE, env), None)
        local_rank = next(int_variables(_LOCAL_RANK, env), None)
        local_world = next(int_variables(_LOCAL_WORLD_SIZE, env), None)
        if (rank is None) != (world is None):
            present, missing = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
            raise ValueError(f"{present} is set but {missing} is not; a launcher must set both (or neither).")
        world_size = 1 if world is None else world[1]
        if world_size < 1:
            raise ValueError(f"{world[0] if world else 'WORLD_SIZE'}={world_size} must be at least 1.")
        rank_value = 0 if rank is None else rank[1]
        if not 0 <= rank_value < world_size:
            raise ValueError(
                f"{rank[0] if rank else 'RANK'}={rank_value} is not a valid rank in a world of "
                f"{world_size} processes (ranks run from 0 to {world_size - 1})."
            )
        local_world_size = world_size if local_world is None else local_world[1]
        local_rank_value = rank_value if local_rank is None else local_rank[1]
        if local_world is not None and not 1 <= local_world_size <= world_size:
            raise ValueError(
                f"{local_world[0]}={local_world_size} must be between 1 and the world size {world_size}."
            )
        if not 0 <= local_rank_value < local_world_size:
            name = local_rank[0] if local_rank else "LOCAL_RANK"
            raise ValueError(
                f"{name}={local_rank_value} is not a valid local rank on a node of {local_world_size} "
                "processes."
            )
        port_raw = env.get("MASTER_PORT", "").strip()
        try:
            port = int(port_raw) if port_raw else None
        except ValueError:
            raise ValueError(f"MASTER_PORT={port_raw!r} must be a port number.") from None
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"MASTER_PORT={port} is outside the range of TCP ports (1-65535).")
        return cls(
            rank=rank_value,
            world_size=world_size,
            local_rank=local_rank_value,
            local_world_size=local_world_size,
            master_addr=env.get("MASTER_ADDR", "").strip() or None,
            master_port=port,
            launched=rank is not None,
            elastic_attempt=_attempt(env),
        )
