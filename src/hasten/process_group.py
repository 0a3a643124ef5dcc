"""Joining the process group a launcher describes: backend choice, rendezvous, and clean exit.

``create_process_state`` reads the launch environment once and joins (or adopts) the default
process group; :class:`hasten.state.PartialState` keeps what it returns as the record every
instance in the process shares.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.device import device_for_local_process
from hasten.utils.environment import parse_flag_from_env
from hasten.utils.errors import ConfigurationError, RendezvousTimeoutError
from hasten.utils.process_env import LaunchEnvironment

logger = logging.getLogger(__name__)

_BACKEND_FOR_DEVICE = {"cuda": "nccl", "xpu": "xccl", "npu": "hccl", "cpu": "gloo", "mps": "gloo"}
_DISTRIBUTED_TYPE_FOR_DEVICE = {
    "cuda": DistributedType.MULTI_GPU,
    "xpu": DistributedType.MULTI_XPU,
    "npu": DistributedType.MULTI_NPU,
    "cpu": DistributedType.MULTI_CPU,
    "mps": DistributedType.MULTI_CPU,
}
_BACKEND_NEEDS = {"nccl": "cuda", "xccl": "xpu", "hccl": "npu"}


@dataclass(frozen=True)
class ProcessState:
    """What this process learned when it joined (or had no) process group; ``PartialState`` shares it."""

    launch: LaunchEnvironment
    distributed_type: DistributedType
    backend: str | None
    device: torch.device
    num_processes: int
    process_index: int
    local_process_index: int
    cpu: bool
    debug: bool
    fork_launched: bool
    timeout: datetime.timedelta
    """How long collectives wait for every rank (the process group's timeout)."""


def _timeout(value: Any) -> datetime.timedelta | None:
    if value is None or isinstance(value, datetime.timedelta):
        return value
    if isinstance(value, (int, float)) and value > 0:
        return datetime.timedelta(seconds=value)
    raise ConfigurationError(
        f"timeout={value!r} must be a datetime.timedelta or a positive number of seconds."
    )


def _choose_backend(requested: str | None, device: torch.device) -> str:
    backend = (requested or _BACKEND_FOR_DEVICE.get(device.type, "gloo")).lower()
    needs = _BACKEND_NEEDS.get(backend)
    if needs is not None and device.type != needs:
        raise ConfigurationError(
            f"backend={backend!r} needs a {needs} device, but this process computes on {device.type!r}. "
            f"Use backend='gloo' on CPU (the default), or run where a {needs} device is present."
        )
    return backend


def _join_process_group(launch: LaunchEnvironment, backend: str, kwargs: dict[str, Any]) -> None:
    timeout = _timeout(kwargs.pop("timeout", None))
    address = launch.init_method
    init_method = kwargs.pop("init_method", None)
    extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    if init_method is None and launch.elastic_attempt is not None and "store" not in kwargs:
        # torchrun's agent keeps one store for every attempt: after a --max_restarts restart, a
        # worker could read a peer's address from the failed attempt and be refused. A prefix
        # per attempt keeps each attempt's keys apart.
        client = dist.TCPStore(
            str(launch.master_addr),
            int(launch.master_port or 0),
            launch.world_size,
            is_master=False,
            timeout=timeout or datetime.timedelta(minutes=30),
        )
        kwargs["store"] = dist.PrefixStore(f"hasten/attempt_{launch.elastic_attempt}", client)
    elif init_method is None:
        init_method = address
    try:
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=launch.rank,
            world_size=launch.world_size,
            **extra,
            **kwargs,
        )
        atexit.register(_destroy_at_exit)
    except dist.DistError as error:
        waited = f"{timeout.total_seconds():g} s" if timeout is not None else "the default timeout"
        if launch.rank == 0:
            cause = "the other ranks did not all connect to it"
        else:
            cause = "rank 0 could not be reached there"
        raise RendezvousTimeoutError(
            f"Rank {launch.rank} of {launch.world_size} could not join the process group at {address} "
            f"within {waited}: {cause}. Start all {launch.world_size} processes with the same MASTER_ADDR "
            "and "
            "MASTER_PORT, check that rank 0 is reachable from every machine, or give slow starters more time "
            f"with InitProcessGroupKwargs(timeout=...). Underlying error: {str(error).splitlines()[0]}"
        ) from error


def _group_timeout() -> datetime.timedelta:
    """The live default group's timeout (read from its CPU backend; torch's default when hidden)."""
    try:
        timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return dist.default_pg_timeout
    return timeout if isinstance(timeout, datetime.timedelta) else dist.default_pg_timeout


def _adopt_process_group(launch: LaunchEnvironment) -> tuple[int, int, int]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = launch.local_rank if launch.world_size == world_size else rank
    return rank, world_size, local_rank


def create_process_state(cpu: bool, kwargs: dict[str, Any]) -> ProcessState:
    """Read the launch environment and join (or adopt) the process group it describes."""
    cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU")
    launch = LaunchEnvironment.from_environ()
    requested_backend = kwargs.pop("backend", None)
    already = dist.is_available() and dist.is_initialized()
    wants_group = already or launch.is_distributed or (launch.launched and launch.master_addr is not None)
    if not wants_group:
        if kwargs or requested_backend:
            logger.debug("Single process: process-group arguments %s ignored.", sorted(kwargs))
        return ProcessState(
            launch=launch,
            distributed_type=DistributedType.NO,
            backend=None,
            device=device_for_local_process(0, cpu),
            num_processes=1,
            process_index=0,
            local_process_index=0,
            cpu=cpu,
            debug=parse_flag_from_env("ACCELERATE_DEBUG_MODE"),
            fork_launched=parse_flag_from_env("FORK_LAUNCHED"),
            timeout=dist.default_pg_timeout,
        )
    if already:
        rank, world_size, local_rank = _adopt_process_group(launch)
        device = device_for_local_process(local_rank, cpu)
        backend = str(dist.get_backend())
    else:
        rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
        device = device_for_local_process(local_rank, cpu)
        backend = _choose_backend(requested_backend, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _join_process_group(launch, backend, kwargs)
    return ProcessState(
        launch=launch,
        distributed_type=_DISTRIBUTED_TYPE_FOR_DEVICE.get(device.type, DistributedType.MULTI_CPU),
        backend=backend,
        device=device,
        num_processes=world_size,
        process_index=rank,
        local_process_index=local_rank,
        cpu=cpu,
        debug=parse_flag_from_env("ACCELERATE_DEBUG_MODE"),
        fork_launched=parse_flag_from_env("FORK_LAUNCHED"),
        timeout=_group_timeout(),
    )


def _destroy_at_exit() -> None:
    """Tear the default group down before the interpreter exits.

    A script that never destroys it leaves gloo's threads running into interpreter shutdown,
    where the process can abort ("terminate called without an active exception", exit -6) and
    torchrun then reports a failure the script did not have.
    """
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
