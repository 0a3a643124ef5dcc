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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hasten.utils.constants import launch_variables
from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.device import device_for_local_process
from hasten.utils.environment import parse_flag_from_env
from hasten.utils.errors import ConfigurationError, RendezvousTimeoutError
from hasten.utils.process_env import LaunchEnvironment

logger = logging.getLogger(__name__)

_LAUNCH = launch_variables("PartialState")  # field -> the variable `hasten launch` writes
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
    arguments: Mapping[str, Any] = field(default_factory=dict)
    """What the state holds for each process-group argument a later ``PartialState(...)`` may pass
    (normalised): the group's ``backend``, ``timeout`` and ``init_method``, and every other argument
    the group was formed with (for a single process: the arguments the first state was given)."""


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


def _normalised(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The process-group arguments with ``backend`` lower-cased and ``timeout`` as a ``timedelta``."""
    arguments = dict(kwargs)
    if arguments.get("backend") is not None:
        arguments["backend"] = str(arguments["backend"]).lower()
    if arguments.get("timeout") is not None:
        arguments["timeout"] = _timeout(arguments["timeout"])
    return {name: value for name, value in arguments.items() if value is not None}


def _join_process_group(launch: LaunchEnvironment, backend: str, kwargs: dict[str, Any]) -> str | None:
    """Form the default group; returns the ``init_method`` used (``None`` when joined through a store)."""
    timeout = kwargs.pop("timeout", None)
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
    elif init_method is None and "store" not in kwargs:
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
    return init_method


def _group_timeout() -> datetime.timedelta | None:
    """The live default group's timeout (read from its CPU backend; ``None`` when torch hides it)."""
    try:
        timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return None
    return timeout if isinstance(timeout, datetime.timedelta) else None


def _adopt_process_group(launch: LaunchEnvironment) -> tuple[int, int, int]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = launch.local_rank if launch.world_size == world_size else rank
    return rank, world_size, local_rank


def _show(value: Any) -> str:
    if isinstance(value, datetime.timedelta):
        return f"{value.total_seconds():g} s"
    return repr(value)


def same_value(requested: Any, held: Any) -> bool:
    """Whether a setting asked for again equals the one held (identical, or ``==``)."""
    try:
        return requested is held or bool(requested == held)
    except Exception:  # objects whose == does not give a truth value (tensors, ...)
        return False


def conflicting_arguments(state: ProcessState, cpu: bool, kwargs: Mapping[str, Any]) -> list[str]:
    """What a later ``PartialState(cpu, **kwargs)`` asks that the live ``state`` does not hold, one line each.

    ``cpu=True`` conflicts with a state that computes on an accelerator. An argument the state
    holds (see :attr:`ProcessState.arguments`) must be equal to it. With a process group, an
    argument the group was formed without conflicts too; with none (a single process), there is
    nothing it could have changed.
    """
    problems = []
    if cpu and state.device.type != "cpu":
        problems.append(f"cpu=True, but the state computes on {str(state.device)!r}")
    for name, value in _normalised(kwargs).items():
        if name in state.arguments:
            if not same_value(value, state.arguments[name]):
                problems.append(
                    f"{name}={kwargs[name]!r}, but the state holds {_show(state.arguments[name])}"
                )
        elif state.backend is not None:
            problems.append(f"{name}={kwargs[name]!r}, but the process group was formed without it")
    return problems


def refuse_changes(cls_name: str, problems: list[str]) -> None:
    """Raise, listing ``problems``, when a later state constructor asks what the live state cannot change."""
    if problems:
        raise ConfigurationError(
            f"{cls_name}(...) asks for settings this process's live state cannot change:\n- "
            + "\n- ".join(problems)
            + "\nPass them the first time the state is created (the first `PartialState` or `Accelerator`), "
            "or reset the state (and destroy the process group) first."
        )


def create_process_state(cpu: bool, kwargs: dict[str, Any]) -> ProcessState:
    """Read the launch environment and join (or adopt) the process group it describes.

    Raises:
        ConfigurationError: an argument is invalid, or contradicts the process group that already exists.
    """
    cpu = cpu or parse_flag_from_env(_LAUNCH["cpu"])
    launch = LaunchEnvironment.from_environ()
    requested = _normalised(kwargs)
    already = dist.is_available() and dist.is_initialized()
    wants_group = already or launch.is_distributed or (launch.launched and launch.master_addr is not None)
    backend: str | None = None
    arguments = dict(requested)
    rank, world_size, local_rank = 0, 1, 0
    if already:
        rank, world_size, local_rank = _adopt_process_group(launch)
        backend = str(dist.get_backend())
        arguments = {"backend": backend}
    elif wants_group:
        rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
        device = device_for_local_process(local_rank, cpu)
        backend = _choose_backend(requested.get("backend"), device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        options = {name: value for name, value in requested.items() if name != "backend"}
        init_method = _join_process_group(launch, backend, options)
        arguments["backend"] = backend
        if init_method is not None:
            arguments["init_method"] = init_method
    elif requested:
        logger.debug("Single process: process-group arguments %s ignored.", sorted(requested))
    timeout = (_group_timeout() if wants_group else None) or requested.get("timeout")
    if timeout is not None:
        arguments["timeout"] = timeout
    device = device_for_local_process(local_rank, cpu)
    distributed_type = (
        _DISTRIBUTED_TYPE_FOR_DEVICE.get(device.type, DistributedType.MULTI_CPU)
        if wants_group
        else DistributedType.NO
    )
    state = ProcessState(
        launch=launch,
        distributed_type=distributed_type,
        backend=backend,
        device=device,
        num_processes=world_size,
        process_index=rank,
        local_process_index=local_rank,
        cpu=cpu,
        debug=parse_flag_from_env(_LAUNCH["debug"]),
        fork_launched=parse_flag_from_env("FORK_LAUNCHED"),
        timeout=timeout or dist.default_pg_timeout,
        arguments=arguments,
    )
    if already and (problems := conflicting_arguments(state, False, kwargs)):
        raise ConfigurationError(
            "PartialState(...) adopts the process group this process already joined, which it cannot "
            "change:\n- " + "\n- ".join(problems) + "\nDrop these arguments, or pass them where the group "
            "is created."
        )
    return state


def _destroy_at_exit() -> None:
    """Tear the default group down before the interpreter exits.

    A script that never destroys it leaves gloo's threads running into interpreter shutdown,
    where the process can abort ("terminate called without an active exception", exit -6) and
    torchrun then reports a failure the script did not have.
    """
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
