"""The state every process shares with itself: who it is, which device it uses, its process group.

:class:`PartialState` is created from the environment a launcher leaves
(``torchrun``, ``hasten launch``, MPI) or, with none, describes a single
process. Every ``PartialState()`` in a process reads the same shared record;
the process group is created once, by the first one. Tests reset the record
with ``PartialState._reset_state()`` (and ``AcceleratorState._reset_state``,
``GradientState._reset_state``), which leaves the process group alone.

:class:`AcceleratorState` adds mixed precision and the engine plugins,
:class:`GradientState` (defined in :mod:`hasten.gradient_state`, importable here as in
Accelerate) the gradient-accumulation bookkeeping that the ``Accelerator`` and its data
loaders share.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist

from hasten.gradient_state import GradientState  # noqa: F401  (Accelerate's path: hasten.state.GradientState)
from hasten.process_group import (
    ProcessState,
    conflicting_arguments,
    create_process_state,
    refuse_changes,
    same_value,
)
from hasten.utils.batches import split_for_process
from hasten.utils.constants import launch_variables
from hasten.utils.dataclasses.enums import DistributedType, PrecisionType
from hasten.utils.dataclasses.plugins.deepspeed import active_plugin, named_plugin, select_plugin
from hasten.utils.environment import parse_choice_from_env, parse_flag_from_env
from hasten.utils.errors import RendezvousTimeoutError, StateResetError
from hasten.utils.shared_dict import ThreadLocalSharedDict  # noqa: F401  (Accelerate's path)

F = TypeVar("F", bound=Callable[..., Any])


def do_nothing(*args: Any, **kwargs: Any) -> None:
    """Take any arguments and do nothing (what ``on_main_process`` gives the other processes)."""
    return None


class PartialState:
    """This process's place in the job: rank, device, process group and the helpers built on them.

    Args:
        cpu: compute on the CPU even when an accelerator is present (``ACCELERATE_USE_CPU``).
        **kwargs: passed to ``torch.distributed.init_process_group`` when the group is created:
            ``backend`` (default ``gloo`` on CPU, ``nccl`` on CUDA), ``init_method`` and ``timeout``
            (a ``timedelta`` or seconds), as :class:`InitProcessGroupKwargs` produces them.

    Every ``PartialState()`` in a process shares the first one's state; a later one whose
    arguments differ from what that state holds raises (see :func:`conflicting_arguments`).

    Raises:
        ValueError: the launch environment is inconsistent (checked before any network call).
        ConfigurationError: an argument differs from what the live state holds.
        RendezvousTimeoutError: the other processes did not all arrive within the timeout.
    """

    _shared: ClassVar[ProcessState | None] = None

    def __init__(self, cpu: bool = False, **kwargs: Any) -> None:
        if PartialState._shared is None:
            PartialState._shared = create_process_state(cpu, dict(kwargs))
            return
        refuse_changes(type(self).__name__, conflicting_arguments(PartialState._shared, cpu, kwargs))

    @classmethod
    def _reset_state(cls) -> None:
        """Forget the shared record (for tests); the process group, if any, stays up and is adopted next
        time."""
        PartialState._shared = None

    @property
    def _state(self) -> ProcessState:
        if PartialState._shared is None:
            raise StateResetError("The process state was reset; create `PartialState()` again.")
        return PartialState._shared

    def __repr__(self) -> str:
        s = self._state
        return (
            "Distributed environment: "
            f"{s.distributed_type.value}{'  Backend: ' + s.backend if s.backend else ''}\n"
            f"Num processes: {s.num_processes}\nProcess index: {s.process_index}\n"
            f"Local process index: {s.local_process_index}\nDevice: {s.device}\n"
        )

    # --- who and where ------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether the shared state exists in this process."""
        return PartialState._shared is not None

    @property
    def distributed_type(self) -> DistributedType:
        """How the processes share the work (``NO`` for a single process)."""
        return self._state.distributed_type

    @property
    def backend(self) -> str | None:
        """The process-group backend (``"gloo"``, ``"nccl"``, …), ``None`` for a single process."""
        return self._state.backend

    @property
    def device(self) -> torch.device:
        """The device this process computes on."""
        return self._state.device

    @property
    def default_device(self) -> torch.device:
        """The device a process with this local rank uses by default (same as :attr:`device`)."""
        return self._state.device

    @property
    def num_processes(self) -> int:
        """How many processes take part in the job."""
        return self._state.num_processes

    @property
    def process_index(self) -> int:
        """This process's global rank."""
        return self._state.process_index

    @property
    def local_process_index(self) -> int:
        """This process's rank on its machine."""
        return self._state.local_process_index

    @property
    def debug(self) -> bool:
        """Whether collectives check inputs across ranks first (``ACCELERATE_DEBUG_MODE``); settable."""
        return self._state.debug

    @debug.setter
    def debug(self, value: bool) -> None:
        PartialState._shared = replace(self._state, debug=bool(value))

    @property
    def timeout(self) -> datetime.timedelta:
        """How long collectives and barriers wait for every rank before raising."""
        return self._state.timeout

    @property
    def fork_launched(self) -> bool:
        """Whether the processes were forked by a notebook launcher."""
        return self._state.fork_launched

    @property
    def use_distributed(self) -> bool:
        """Whether more than one process takes part through a process group."""
        return self._state.distributed_type != DistributedType.NO and self._state.num_processes > 1

    @property
    def is_main_process(self) -> bool:
        """Whether this is the global rank 0."""
        return self._state.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        """Whether this is local rank 0 on its machine."""
        return self._state.local_process_index == 0

    @property
    def is_last_process(self) -> bool:
        """Whether this is the highest global rank."""
        return self._state.process_index == self._state.num_processes - 1

    # --- synchronisation ----------------------------------------------------------------------

    def wait_for_everyone(self) -> None:
        """Block until every process reaches this point.

        On gloo, a monitored barrier names the ranks that did not arrive when the timeout passes.

        Raises:
            RendezvousTimeoutError: some ranks did not arrive before the process-group timeout.
        """
        if not self.use_distributed:
            return
        if self.backend != "gloo":
            dist.barrier()
            return
        try:
            dist.monitored_barrier(timeout=self._state.timeout, wait_all_ranks=True)
        except RuntimeError as error:
            raise RendezvousTimeoutError(
                f"wait_for_everyone on rank {self.process_index}: not every rank arrived before the timeout. "
                f"{str(error).splitlines()[0]}. A rank that crashed or skipped this call is the usual cause."
            ) from error

    @contextlib.contextmanager
    def _goes_first(self, first: bool) -> Iterator[None]:
        if not first:
            self.wait_for_everyone()
        yield
        if first:
            self.wait_for_everyone()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Run the block on the main process first, then on the others (e.g. to fill a cache once)."""
        with self._goes_first(self.is_main_process):
            yield

    @contextlib.contextmanager
    def local_main_process_first(self) -> Iterator[None]:
        """Run the block on each machine's local main process first, then on the others."""
        with self._goes_first(self.is_local_main_process):
            yield

    # --- running code on some processes -------------------------------------------------------

    def _only_if(self, runs_here: bool, function: F | None) -> F:
        if function is None:
            raise TypeError("Pass the function to decorate (use these as `@state.on_main_process`).")
        return function if runs_here else do_nothing  # type: ignore[return-value]

    def on_main_process(self, function: F | None = None) -> F:
        """Decorator: the function runs on the main process and does nothing elsewhere."""
        return self._only_if(self.is_main_process or not self.use_distributed, function)

    def on_local_main_process(self, function: F | None = None) -> F:
        """Decorator: the function runs on each machine's local main process only."""
        return self._only_if(self.is_local_main_process or not self.use_distributed, function)

    def on_last_process(self, function: F | None = None) -> F:
        """Decorator: the function runs on the last process only."""
        return self._only_if(self.is_last_process or not self.use_distributed, function)

    def on_process(self, function: F | None = None, process_index: int | None = None) -> Any:
        """Decorator: the function runs on the process with global rank ``process_index`` only.

        Usable as ``@state.on_process(process_index=1)``.
        """
        if process_index is None:
            raise TypeError(
                "on_process needs process_index=<rank>, e.g. `@state.on_process(process_index=1)`."
            )
        if function is None:
            return lambda fn: self.on_process(fn, process_index=process_index)
        return self._only_if(self.process_index == process_index or not self.use_distributed, function)

    def on_local_process(self, function: F | None = None, local_process_index: int | None = None) -> Any:
        """Decorator: the function runs on the process with local rank ``local_process_index`` only."""
        if local_process_index is None:
            raise TypeError(
                "on_local_process needs local_process_index=<rank>, e.g. "
                "`@state.on_local_process(local_process_index=1)`."
            )
        if function is None:
            return lambda fn: self.on_local_process(fn, local_process_index=local_process_index)
        runs = self.local_process_index == local_process_index or not self.use_distributed
        return self._only_if(runs, function)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the local main process only."""
        if self.is_local_main_process:
            print(*args, **kwargs)

    # --- splitting inputs ---------------------------------------------------------------------

    @contextlib.contextmanager
    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
        """Yield this process's share of ``inputs``: contiguous, in rank order, sizes differing by at most
        one.

        ``inputs`` may be a list, tuple, tensor (split on dim 0) or a dict whose values are all
        of those with one common length. With ``apply_padding``, shorter shares are padded with
        their last element so every process gets the same length (useful before ``gather``).

        Raises:
            ValueError: the values of a dict have different lengths.
        """
        if self.num_processes == 1:
            yield inputs
            return
        yield split_for_process(inputs, self.process_index, self.num_processes, apply_padding)

    # --- life cycle ---------------------------------------------------------------------------

    def set_device(self) -> None:
        """Make :attr:`device` the current device of its accelerator type (no-op on CPU)."""
        device = self.device
        if device.type in ("cpu", "mps"):
            return
        getattr(torch, device.type).set_device(device)

    def destroy_process_group(self, group: Any = None) -> None:
        """Destroy ``group`` (the default group when ``None``) if it exists."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group(group)


@dataclass
class _AcceleratorStateData:
    mixed_precision: PrecisionType
    distributed_type: DistributedType
    dynamo_plugin: Any = None
    deepspeed_plugins: dict[str, Any] | None = None
    fsdp_plugin: Any = None
    torch_tp_plugin: Any = None
    megatron_lm_plugin: Any = None
    parallelism_config: Any = None

    def conflicts(self, mixed_precision: str | None, plugins: dict[str, Any]) -> list[str]:
        """What a later ``AcceleratorState(...)`` asks that differs from this record, one line each."""
        problems = []
        precision = (
            None if mixed_precision is None else PrecisionType.parse(mixed_precision, "mixed_precision")
        )
        if precision is not None and precision != self.mixed_precision:
            held = self.mixed_precision.value
            problems.append(f"mixed_precision={mixed_precision!r}, but the state holds {held!r}")
        for name, value in plugins.items():
            held = getattr(self, name)
            if value is not None and not same_value(value, held):
                holds = "was created without one" if held is None else "holds a different one"
                given = f"{name.replace('plugins', 'plugin')}=<{type(value).__name__}>"
                problems.append(f"{given}, but the state {holds}")
        return problems


_LAUNCH = launch_variables("AcceleratorState")  # field -> the variable `hasten launch` writes


def _resolve_mixed_precision(mixed_precision: str | None) -> PrecisionType:
    if mixed_precision is not None:
        return PrecisionType.parse(mixed_precision, "mixed_precision")
    variable = _LAUNCH["mixed_precision"]
    return PrecisionType.parse(parse_choice_from_env(variable, "no"), f"environment variable {variable}")


def _engine_distributed_type(
    base: DistributedType, deepspeed: Any, fsdp: Any, megatron: Any
) -> DistributedType:
    """The engine's type when a plugin or ``ACCELERATE_USE_*`` asks for one (also on a single process)."""
    if deepspeed is not None or parse_flag_from_env(_LAUNCH["deepspeed_plugin"]):
        return DistributedType.DEEPSPEED
    if fsdp is not None or parse_flag_from_env(_LAUNCH["fsdp_plugin"]):
        return DistributedType.FSDP
    if megatron is not None or parse_flag_from_env("ACCELERATE_USE_MEGATRON_LM"):
        return DistributedType.MEGATRON_LM
    return base


class AcceleratorState(PartialState):
    """:class:`PartialState` plus the training set-up: mixed precision and engine plugins.

    Everything :class:`PartialState` offers is available here too. ``distributed_type`` becomes
    ``DEEPSPEED``, ``FSDP`` or ``MEGATRON_LM`` when the matching plugin is given or ``ACCELERATE_USE_*``
    asks for it. A later ``AcceleratorState(...)`` shares the live state; an argument that differs from
    what it holds (``mixed_precision``, a plugin, ``cpu`` or a process-group argument) raises.

    Raises:
        ConfigurationError: ``mixed_precision`` is not one of ``no``, ``fp16``, ``bf16``, ``fp8``, or
            an argument differs from what the live state was created with.
    """

    _accelerator: ClassVar[_AcceleratorStateData | None] = None

    def __init__(
        self,
        mixed_precision: str | None = None,
        cpu: bool = False,
        dynamo_plugin: Any = None,
        deepspeed_plugin: Any = None,
        fsdp_plugin: Any = None,
        torch_tp_plugin: Any = None,
        megatron_lm_plugin: Any = None,
        parallelism_config: Any = None,
        _from_accelerator: bool = False,
        **kwargs: Any,
    ) -> None:
        deepspeed_plugins: dict[str, Any] | None
        if isinstance(deepspeed_plugin, dict):
            deepspeed_plugins = deepspeed_plugin
        else:
            deepspeed_plugins = None if deepspeed_plugin is None else {"default": deepspeed_plugin}
        plugins = {
            "dynamo_plugin": dynamo_plugin,
            "deepspeed_plugins": deepspeed_plugins,
            "fsdp_plugin": fsdp_plugin,
            "torch_tp_plugin": torch_tp_plugin,
            "megatron_lm_plugin": megatron_lm_plugin,
            "parallelism_config": parallelism_config,
        }
        live = AcceleratorState._accelerator
        if live is not None and PartialState._shared is not None:
            problems = conflicting_arguments(PartialState._shared, cpu, kwargs)
            refuse_changes(type(self).__name__, problems + live.conflicts(mixed_precision, plugins))
            return
        super().__init__(cpu, **kwargs)
        AcceleratorState._accelerator = _AcceleratorStateData(
            mixed_precision=_resolve_mixed_precision(mixed_precision),
            distributed_type=_engine_distributed_type(
                super().distributed_type, deepspeed_plugins, fsdp_plugin, megatron_lm_plugin
            ),
            **plugins,
        )

    @classmethod
    def _reset_state(cls, reset_partial_state: bool = False) -> None:
        """Forget the accelerator record (for tests); with ``reset_partial_state``, the process record too."""
        AcceleratorState._accelerator = None
        if reset_partial_state:
            PartialState._reset_state()

    @property
    def _data(self) -> _AcceleratorStateData:
        if AcceleratorState._accelerator is None:
            raise StateResetError("The accelerator state was reset; create `AcceleratorState()` again.")
        return AcceleratorState._accelerator

    @property
    def initialized(self) -> bool:
        """Whether the accelerator record exists in this process."""
        return AcceleratorState._accelerator is not None

    @property
    def distributed_type(self) -> DistributedType:
        """How the work is shared, including the engine (``DEEPSPEED``, ``FSDP``, ``MEGATRON_LM``)."""
        return self._data.distributed_type

    @property
    def mixed_precision(self) -> str:
        """The mixed-precision mode: ``"no"``, ``"fp16"``, ``"bf16"`` or ``"fp8"``."""
        return self._data.mixed_precision.value

    @property
    def dynamo_plugin(self) -> Any:
        """The ``TorchDynamoPlugin`` in use, if any."""
        return self._data.dynamo_plugin

    @property
    def deepspeed_plugins(self) -> dict[str, Any] | None:
        """The DeepSpeed plugins by name, if any."""
        return self._data.deepspeed_plugins

    @property
    def deepspeed_plugin(self) -> Any:
        """The DeepSpeed plugin in use (the selected one when several were given), if any."""
        return active_plugin(self._data.deepspeed_plugins)

    def get_deepspeed_plugin(self, name: str) -> Any:
        """The DeepSpeed plugin passed under ``name`` (``ConfigurationError`` when none has it)."""
        return named_plugin(self._data.deepspeed_plugins, name)

    def select_deepspeed_plugin(self, name: str | None = None) -> None:
        """Make the plugin passed under ``name`` the one the next ``prepare`` uses."""
        select_plugin(self._data.deepspeed_plugins, name)

    @property
    def fsdp_plugin(self) -> Any:
        """The ``FullyShardedDataParallelPlugin`` in use, if any."""
        return self._data.fsdp_plugin

    @property
    def torch_tp_plugin(self) -> Any:
        """The tensor-parallel plugin in use, if any."""
        return self._data.torch_tp_plugin

    @property
    def megatron_lm_plugin(self) -> Any:
        """The ``MegatronLMPlugin`` in use, if any."""
        return self._data.megatron_lm_plugin

    @property
    def parallelism_config(self) -> Any:
        """The n-D parallelism layout in use, if any."""
        return self._data.parallelism_config


def is_initialized() -> bool:
    """Whether this process's ``AcceleratorState`` exists (an ``Accelerator`` was created)."""
    return AcceleratorState._accelerator is not None
