"""Kwargs handlers: dataclasses that carry the keyword arguments of a torch object hasten builds.

``to_kwargs()`` returns only the fields changed from the class's declared defaults, so what
you did not set is left to torch's own defaults. It compares against the declarations, never
against a new instance built under a cleared environment.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from hasten.utils.dataclasses.enums import DDPCommunicationHookType, FP8BackendType


class KwargsHandler:
    """Mixin for the kwargs dataclasses: ``to_dict()`` and ``to_kwargs()``.

    A class whose unset fields resolve to something else (from the environment, or a fixed
    default) lists those resolved defaults in ``_UNSET_MEANS``, so ``to_kwargs()`` compares with them.
    """

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def to_kwargs(self) -> dict[str, Any]:
        """The fields whose values differ from the class's declared defaults."""
        defaults: dict[str, Any] = {}
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            if item.default is not dataclasses.MISSING:
                defaults[item.name] = item.default
            elif item.default_factory is not dataclasses.MISSING:
                defaults[item.name] = item.default_factory()
        defaults.update(getattr(self, "_UNSET_MEANS", {}))
        return {key: value for key, value in self.to_dict().items() if key not in defaults or defaults[key] != value}


@dataclass
class AutocastKwargs(KwargsHandler):
    """Arguments of ``torch.autocast`` for mixed precision (``enabled``, ``cache_enabled``)."""

    enabled: bool = True
    cache_enabled: Union[bool, None] = None


@dataclass
class GradScalerKwargs(KwargsHandler):
    """Arguments of ``torch.amp.GradScaler`` (fp16 loss scaling)."""

    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    enabled: bool = True


@dataclass
class InitProcessGroupKwargs(KwargsHandler):
    """Arguments of ``torch.distributed.init_process_group``: ``backend``, ``init_method``, ``timeout``.

    ``timeout`` is a ``datetime.timedelta`` (a number of seconds is converted). The declared
    default backend is Accelerate's ``"nccl"``; hasten's state picks gloo on CPU unless the
    backend is set explicitly.
    """

    backend: Union[str, None] = "nccl"
    init_method: Union[str, None] = None
    timeout: Union[datetime.timedelta, None] = None

    def __post_init__(self) -> None:
        if isinstance(self.timeout, (int, float)) and not isinstance(self.timeout, bool):
            self.timeout = datetime.timedelta(seconds=self.timeout)
        if self.timeout is not None and not isinstance(self.timeout, datetime.timedelta):
            raise ValueError(f"timeout={self.timeout!r} must be a datetime.timedelta or a number of seconds")
        if self.backend is not None and self.backend.lower() not in ("nccl", "gloo", "mpi", "ucc", "xccl", "hccl", "cpu:gloo,cuda:nccl"):
            raise ValueError(
                f"backend={self.backend!r} is not a torch.distributed backend; use 'gloo' (CPU), 'nccl' (CUDA), "
                "'mpi', 'ucc' or 'xccl'"
            )


@dataclass
class DistributedDataParallelKwargs(KwargsHandler):
    """Arguments of ``DistributedDataParallel``, plus a gradient communication hook.

    ``comm_hook`` compresses or approximates gradient all-reduces (``fp16``, ``bf16``,
    ``power_sgd``, ``batched_power_sgd``); ``comm_wrapper`` (``fp16``/``bf16``) compresses around
    another hook; ``comm_state_option`` holds PowerSGD's options. The hook fields are not DDP
    arguments, so ``to_dict()`` leaves them out.
    """

    dim: int = 0
    broadcast_buffers: bool = True
    bucket_cap_mb: int = 25
    find_unused_parameters: bool = False
    check_reduction: bool = False
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    comm_hook: DDPCommunicationHookType = DDPCommunicationHookType.NO
    comm_wrapper: DDPCommunicationHookType = DDPCommunicationHookType.NO
    comm_state_option: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.comm_hook = DDPCommunicationHookType.parse(self.comm_hook, "comm_hook")
        self.comm_wrapper = DDPCommunicationHookType.parse(self.comm_wrapper, "comm_wrapper")
        wrappers = (DDPCommunicationHookType.NO, DDPCommunicationHookType.FP16, DDPCommunicationHookType.BF16)
        if self.comm_wrapper not in wrappers:
            raise ValueError(f"comm_wrapper={self.comm_wrapper.value!r} must be one of {[w.value for w in wrappers]}")

    def to_dict(self, ignore_keys: tuple[str, ...] = ("comm_hook", "comm_wrapper", "comm_state_option")) -> dict[str, Any]:
        return {key: value for key, value in super().to_dict().items() if key not in ignore_keys}

    def register_comm_hook(self, model: Any) -> None:
        """Register the configured hook on ``model``, a ``DistributedDataParallel`` (no-op for ``"no"``)."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        hooks: dict[DDPCommunicationHookType, Callable[..., Any]] = {
            DDPCommunicationHookType.FP16: default_hooks.fp16_compress_hook,
            DDPCommunicationHookType.BF16: default_hooks.bf16_compress_hook,
            DDPCommunicationHookType.POWER_SGD: powerSGD_hook.powerSGD_hook,
            DDPCommunicationHookType.BATCHED_POWER_SGD: powerSGD_hook.batched_powerSGD_hook,
        }
        wrappers = {
            DDPCommunicationHookType.FP16: default_hooks.fp16_compress_wrapper,
            DDPCommunicationHookType.BF16: default_hooks.bf16_compress_wrapper,
        }
        hook = hooks.get(self.comm_hook)
        if hook is None:
            return
        wrapper = wrappers.get(self.comm_wrapper)
        if wrapper is not None:
            hook = wrapper(hook)
        power_sgd = self.comm_hook in (DDPCommunicationHookType.POWER_SGD, DDPCommunicationHookType.BATCHED_POWER_SGD)
        state = powerSGD_hook.PowerSGDState(None, **self.comm_state_option) if power_sgd else None
        model.register_comm_hook(state=state, hook=hook)


@dataclass
class FP8RecipeKwargs(KwargsHandler):
    """FP8 training options; ``backend`` chooses the engine (``TE``, ``MSAMP``, ``AO``), all of which need
    GPUs with FP8 support, so hasten validates the choice but cannot run them on this CPU machine."""

    opt_level: Union[str, None] = None
    use_autocast_during_eval: Union[bool, None] = None
    margin: Union[int, None] = None
    interval: Union[int, None] = None
    fp8_format: Union[str, None] = None
    amax_history_len: Union[int, None] = None
    amax_compute_algo: Union[str, None] = None
    override_linear_precision: Union[tuple[bool, bool, bool], None] = None
    use_mxfp8_block_scaling: Union[bool, None] = None
    backend: Union[str, None] = None

    def __post_init__(self) -> None:
        if self.backend is not None:
            self.backend = FP8BackendType.parse(self.backend.upper(), "backend").value
        if self.opt_level is not None and self.opt_level not in ("O1", "O2"):
            raise ValueError(f"opt_level={self.opt_level!r} must be 'O1' or 'O2' (MS-AMP levels)")
        if self.fp8_format is not None and self.fp8_format.upper() not in ("HYBRID", "E4M3", "E5M2"):
            raise ValueError(f"fp8_format={self.fp8_format!r} must be one of ['HYBRID', 'E4M3', 'E5M2']")
        if self.amax_compute_algo is not None and self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo={self.amax_compute_algo!r} must be 'max' or 'most_recent'")


@dataclass
class ProfileKwargs(KwargsHandler):
    """A ``torch.profiler.profile``: ``activities`` (``"cpu"``, ``"cuda"``, ...), a ``schedule_option``
    dict (``wait``, ``warmup``, ``active``, ``repeat``, ``skip_first``), ``on_trace_ready``, what to
    record, and ``output_trace_dir`` where Chrome traces are written (one per process)."""

    activities: Union[list[str], None] = None
    schedule_option: Union[dict[str, int], None] = None
    on_trace_ready: Union[Callable[..., Any], None] = None
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    with_flops: bool = False
    with_modules: bool = False
    output_trace_dir: Union[str, None] = None

    _ACTIVITIES = ("cpu", "cuda", "xpu", "mtia", "hpu")

    def __post_init__(self) -> None:
        for activity in self.activities or []:
            if activity not in self._ACTIVITIES:
                raise ValueError(f"activities contains {activity!r}; the choices are {list(self._ACTIVITIES)}")

    def build(self, process_index: int = 0) -> Any:
        """The configured ``torch.profiler.profile`` (enter it as a context manager)."""
        import torch.profiler as profiler

        activities = [getattr(profiler.ProfilerActivity, name.upper()) for name in (self.activities or ["cpu"])]
        schedule = profiler.schedule(**self.schedule_option) if self.schedule_option else None
        on_trace_ready = self.on_trace_ready
        if on_trace_ready is None and self.output_trace_dir is not None:
            folder = Path(self.output_trace_dir)
            folder.mkdir(parents=True, exist_ok=True)

            def on_trace_ready(prof: Any) -> None:
                prof.export_chrome_trace(str(folder / f"trace_rank{process_index}_step{prof.step_num}.json"))

        return profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_trace_ready,
                                record_shapes=self.record_shapes, profile_memory=self.profile_memory,
                                with_stack=self.with_stack, with_flops=self.with_flops, with_modules=self.with_modules)  # fmt: skip
