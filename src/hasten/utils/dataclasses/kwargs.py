"""Kwargs handlers: small dataclasses that customise one torch object the ``Accelerator`` creates.

Each is passed in ``Accelerator(kwargs_handlers=[...])`` and turned into keyword
arguments with :meth:`KwargsHandler.to_kwargs`, which keeps only what the user
changed, so torch's own defaults apply to everything else.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from hasten.utils.atomic import atomic_path
from hasten.utils.constants import PROFILE_PATTERN_NAME
from hasten.utils.dataclasses._env import (
    declared_defaults,
    env_field,
    non_negative_int,
    one_of,
    positive_int,
    read_env,
    resolve_fields,
    to_bool,
    to_float,
)
from hasten.utils.dataclasses.enums import DDPCommunicationHookType, FP8BackendType
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import is_msamp_available, require

if TYPE_CHECKING:
    import torch

_UNSET = object()


class KwargsHandler:
    """Mixin for dataclasses whose :meth:`to_kwargs` returns only the fields that differ from their defaults.

    The defaults are the declared ones (for fields read from the environment: the value
    with no variable set). No object is rebuilt and the environment is never touched.
    """

    _defaults_cache: ClassVar[dict[type, dict[str, Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the fields as set on this object."""
        return copy.deepcopy(self.__dict__)

    @classmethod
    def _default_dict(cls) -> dict[str, Any]:
        if cls not in KwargsHandler._defaults_cache:
            blank = object.__new__(cls)
            blank.__dict__.update(declared_defaults(cls))
            KwargsHandler._defaults_cache[cls] = blank.to_dict()
        return KwargsHandler._defaults_cache[cls]

    def to_kwargs(self) -> dict[str, Any]:
        """The fields whose values differ from the class defaults, as keyword arguments."""
        defaults = self._default_dict()
        return {key: value for key, value in self.to_dict().items() if defaults.get(key, _UNSET) != value}


def _require_bool(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name}={value!r} must be True or False.")


@dataclass
class AutocastKwargs(KwargsHandler):
    """Arguments for ``torch.autocast`` under mixed precision (see ``get_mixed_precision_context_manager``).

    Args:
        enabled: whether autocasting is on inside the context.
        cache_enabled: whether autocast caches casted weights (``None``: torch's default).
    """

    enabled: bool = True
    cache_enabled: bool | None = None

    def __post_init__(self) -> None:
        _require_bool(self, "enabled")
        if self.cache_enabled is not None:
            _require_bool(self, "cache_enabled")


_DDP_WRAPPERS = (DDPCommunicationHookType.NO, DDPCommunicationHookType.FP16, DDPCommunicationHookType.BF16)
_POWER_SGD = (DDPCommunicationHookType.POWER_SGD, DDPCommunicationHookType.BATCHED_POWER_SGD)


@dataclass
class DistributedDataParallelKwargs(KwargsHandler):
    """Arguments for ``torch.nn.parallel.DistributedDataParallel``, plus a gradient communication hook.

    ``to_kwargs()`` gives the constructor arguments; :meth:`register_comm_hook` then installs
    ``comm_hook`` (optionally wrapped by ``comm_wrapper``, which compresses what another hook
    sends) on the wrapped model. ``comm_state_option`` holds ``PowerSGDState`` arguments.
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
        wrapper = DDPCommunicationHookType.parse(self.comm_wrapper, "comm_wrapper")
        if wrapper not in _DDP_WRAPPERS:
            raise ConfigurationError(
                f"comm_wrapper={self.comm_wrapper!r} is not a wrapper; expected one of "
                f"{[w.value for w in _DDP_WRAPPERS]} (it compresses what comm_hook sends)."
            )
        self.comm_wrapper = wrapper
        if self.comm_state_option and self.comm_hook not in _POWER_SGD:
            raise ConfigurationError(
                f"comm_state_option={self.comm_state_option!r} is only used by the hooks "
                f"{[h.value for h in _POWER_SGD]}, but comm_hook={self.comm_hook.value!r}. "
                "Drop comm_state_option or choose a PowerSGD hook."
            )
        _require_bool(
            self,
            "broadcast_buffers",
            "find_unused_parameters",
            "check_reduction",
            "gradient_as_bucket_view",
            "static_graph",
        )

    def to_dict(
        self, ignore_keys: tuple[str, ...] = ("comm_hook", "comm_wrapper", "comm_state_option")
    ) -> dict[str, Any]:
        """The DDP constructor fields (the hook settings are not constructor arguments)."""
        return {key: value for key, value in super().to_dict().items() if key not in ignore_keys}

    def register_comm_hook(self, model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Install the configured hook on a ``DistributedDataParallel`` model (nothing when
        ``comm_hook="no"``)."""
        if self.comm_hook == DDPCommunicationHookType.NO:
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        hooks: dict[DDPCommunicationHookType, Callable[..., Any]] = {
            DDPCommunicationHookType.FP16: default_hooks.fp16_compress_hook,
            DDPCommunicationHookType.BF16: default_hooks.bf16_compress_hook,
            DDPCommunicationHookType.POWER_SGD: powerSGD_hook.powerSGD_hook,
            DDPCommunicationHookType.BATCHED_POWER_SGD: powerSGD_hook.batched_powerSGD_hook,
        }
        wrappers: dict[DDPCommunicationHookType, Callable[..., Any]] = {
            DDPCommunicationHookType.FP16: default_hooks.fp16_compress_wrapper,
            DDPCommunicationHookType.BF16: default_hooks.bf16_compress_wrapper,
        }
        uses_bf16 = DDPCommunicationHookType.BF16 in (self.comm_hook, self.comm_wrapper)
        backend = str(model.process_group.name()) if hasattr(model, "process_group") else ""
        if uses_bf16 and backend not in ("nccl", "xccl"):
            raise ConfigurationError(
                f"bf16 gradient compression (comm_hook={self.comm_hook.value!r}, comm_wrapper="
                f"{self.comm_wrapper.value!r}) needs NCCL on CUDA or XCCL on XPU, but the model's process "
                "group "
                f"uses {backend!r}. Use 'fp16' compression instead."
            )
        hook = hooks[self.comm_hook]
        if self.comm_wrapper in wrappers:
            hook = wrappers[self.comm_wrapper](hook)
        state = None
        if self.comm_hook in _POWER_SGD:
            accepted = [
                p for p in inspect.signature(powerSGD_hook.PowerSGDState).parameters if p != "process_group"
            ]
            unknown = sorted(set(self.comm_state_option) - set(accepted))
            if unknown:
                raise ConfigurationError(
                    f"comm_state_option has keys {unknown} that PowerSGDState does not take; accepted: "
                    f"{accepted}."
                )
            state = powerSGD_hook.PowerSGDState(None, **self.comm_state_option)
        model.register_comm_hook(state=state, hook=hook)


@dataclass
class GradScalerKwargs(KwargsHandler):
    """Arguments for the ``torch.amp.GradScaler`` used with fp16 mixed precision.

    Args:
        init_scale: the first loss scale.
        growth_factor: how much the scale grows after ``growth_interval`` steps without overflow (> 1).
        backoff_factor: how much it shrinks after an overflow (between 0 and 1).
        growth_interval: steps without overflow before growing.
        enabled: whether scaling happens at all.
    """

    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("init_scale", "growth_factor", "backoff_factor"):
            setattr(self, name, to_float(getattr(self, name), name))
        if not self.init_scale > 0.0:
            raise ConfigurationError(f"init_scale={self.init_scale!r} must be greater than 0.")
        if not self.growth_factor > 1.0:
            raise ConfigurationError(f"growth_factor={self.growth_factor!r} must be greater than 1.0.")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ConfigurationError(f"backoff_factor={self.backoff_factor!r} must be between 0.0 and 1.0.")
        self.growth_interval = positive_int(self.growth_interval, "growth_interval")
        _require_bool(self, "enabled")


@dataclass
class InitProcessGroupKwargs(KwargsHandler):
    """Arguments for ``torch.distributed.init_process_group`` when the state forms the group.

    Args:
        backend: the collective backend (``"gloo"`` on CPU; the default ``"nccl"`` is left to the
            state's choice unless changed, since only the differences are passed on).
        init_method: a rendezvous URL (``tcp://host:port``, ``file://...``; default ``env://``).
        timeout: how long collectives wait for every rank: a ``timedelta`` or seconds.
            ``None`` means 10 minutes for nccl and 30 minutes for other backends.
    """

    backend: str | None = "nccl"
    init_method: str | None = None
    # No variable: the fallback is only what to_kwargs() compares with (the timeout the default backend gets).
    timeout: datetime.timedelta | None = env_field(None, fallback=datetime.timedelta(seconds=600))

    def __post_init__(self) -> None:
        if self.backend is not None:
            import torch.distributed as dist

            known = list(dist.Backend.backend_list)
            if not isinstance(self.backend, str) or (
                ":" not in self.backend and self.backend.lower() not in known
            ):
                raise ConfigurationError(
                    f"backend={self.backend!r} is not a torch.distributed backend; expected one of {known} "
                    "(or a device:backend list such as 'cpu:gloo,cuda:nccl')."
                )
            self.backend = self.backend.lower()
        if self.timeout is None:
            self.timeout = datetime.timedelta(seconds=600 if self.backend == "nccl" else 1800)
        elif (
            isinstance(self.timeout, (int, float)) and not isinstance(self.timeout, bool) and self.timeout > 0
        ):
            self.timeout = datetime.timedelta(seconds=self.timeout)
        elif not isinstance(self.timeout, datetime.timedelta) or self.timeout.total_seconds() <= 0:
            raise ConfigurationError(
                f"timeout={self.timeout!r} must be a positive datetime.timedelta or a positive number of "
                "seconds."
            )


_RECIPE_BACKENDS = (FP8BackendType.TE, FP8BackendType.MSAMP)
_ENV_FP8 = "ACCELERATE_FP8_"


def _fp8_backend(value: Any, name: str) -> str:
    member = FP8BackendType.parse(value, name)
    if member not in _RECIPE_BACKENDS:
        raise ConfigurationError(
            f"{name}={value!r} has no recipe here; expected one of {[b.value for b in _RECIPE_BACKENDS]} "
            "(torchao FP8 is configured without a recipe)."
        )
    return str(member.value)


def _linear_precision_from_env() -> tuple[bool, bool, bool]:
    """``override_linear_precision`` read from ``ACCELERATE_FP8_OVERRIDE_{FPROP,DGRAD,WGRAD}``."""
    fprop, dgrad, wgrad = (
        to_bool(
            read_env(f"{_ENV_FP8}OVERRIDE_{gemm}") or "false",
            f"environment variable {_ENV_FP8}OVERRIDE_{gemm}",
        )
        for gemm in ("FPROP", "DGRAD", "WGRAD")
    )
    return fprop, dgrad, wgrad


def _linear_precision(value: Any, name: str) -> tuple[bool, bool, bool]:
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, bool) for v in value):
        return (value[0], value[1], value[2])
    raise ConfigurationError(f"{name}={value!r} must be three booleans: (fprop, dgrad, wgrad).")


@dataclass
class TERecipeKwargs(KwargsHandler):
    """TransformerEngine's delayed-scaling FP8 recipe; unset fields come from ``ACCELERATE_FP8_*``.

    TransformerEngine needs NVIDIA GPUs, so this object only validates the recipe; the engine is
    imported when the recipe is applied.

    Args:
        use_autocast_during_eval: keep FP8 autocast in evaluation too.
        margin: margin for the scaling factor.
        interval: steps between scaling-factor updates.
        fp8_format: ``"HYBRID"`` (E4M3 forward, E5M2 backward), ``"E4M3"`` or ``"E5M2"``.
        amax_history_len: how many amax values the scaling factor looks back on.
        amax_compute_algo: ``"max"`` or ``"most_recent"``.
        override_linear_precision: run the (fprop, dgrad, wgrad) GEMMs in higher precision.
        use_mxfp8_block_scaling: MXFP8 block scaling (Blackwell GPUs).
    """

    use_autocast_during_eval: bool | None = env_field(_ENV_FP8 + "USE_AUTOCAST_DURING_EVAL", False, to_bool)
    margin: int | None = env_field(_ENV_FP8 + "MARGIN", 0, non_negative_int)
    interval: int | None = env_field(_ENV_FP8 + "INTERVAL", 1, positive_int)
    fp8_format: str | None = env_field(_ENV_FP8 + "FORMAT", "HYBRID", one_of(["HYBRID", "E4M3", "E5M2"]))
    amax_history_len: int | None = env_field(_ENV_FP8 + "AMAX_HISTORY_LEN", 1024, positive_int)
    amax_compute_algo: str | None = env_field(
        _ENV_FP8 + "AMAX_COMPUTE_ALGO", "most_recent", one_of(["max", "most_recent"])
    )
    override_linear_precision: tuple[bool, bool, bool] | None = env_field(
        None, (False, False, False), _linear_precision
    )
    use_mxfp8_block_scaling: bool | None = env_field(_ENV_FP8 + "USE_MXFP8_BLOCK_SCALING", False, to_bool)

    def __post_init__(self) -> None:
        if self.override_linear_precision is None:
            self.override_linear_precision = _linear_precision_from_env()
        resolve_fields(self)


@dataclass
class MSAMPRecipeKwargs(KwargsHandler):
    """MS-AMP's FP8 recipe: ``opt_level`` ``"O1"`` (FP8 weights and gradients) or ``"O2"`` (also the
    optimizer states); unset, ``ACCELERATE_FP8_OPT_LEVEL`` or ``"O2"``."""

    opt_level: str | None = env_field(_ENV_FP8 + "OPT_LEVEL", "O2", one_of(["O1", "O2"]))

    def __post_init__(self) -> None:
        resolve_fields(self)


@dataclass
class FP8RecipeKwargs(TERecipeKwargs, MSAMPRecipeKwargs):
    """The FP8 training recipe for TransformerEngine (``backend="TE"``) or MS-AMP (``backend="MSAMP"``).

    Accelerate's older, combined recipe (the fields of both). Every field left unset is read from
    its ``ACCELERATE_FP8_*`` variable. ``backend`` defaults to MS-AMP when it is installed, else TE.
    """

    backend: str | None = env_field(_ENV_FP8 + "BACKEND", "TE", _fp8_backend)

    def __post_init__(self) -> None:
        if self.backend is None and read_env(_ENV_FP8 + "BACKEND") is None and is_msamp_available():
            self.backend = "MSAMP"
        TERecipeKwargs.__post_init__(self)  # resolves every field, the MS-AMP one included


@dataclass
class AORecipeKwargs(KwargsHandler):
    """torchao's FP8 training recipe.

    Args:
        config: a ``torchao.float8.Float8LinearConfig``; when ``None``, one is built from
            ``pad_inner_dim`` and ``enable_fsdp_float8_all_gather``.
        module_filter_func: ``(module, fully qualified name) -> bool``: which layers to convert
            (default: ``hasten.utils.ao.filter_linear_layers`` without the first and last layers).
        pad_inner_dim: pad matrix dimensions to multiples of 16 (``ACCELERATE_FP8_PAD_INNER_DIM``,
            default true), as ``torch._scaled_mm`` needs.
        enable_fsdp_float8_all_gather: all-gather FSDP2 parameters in FP8
            (``ACCELERATE_FP8_ENABLE_FSDP_FLOAT8_ALL_GATHER``, default true).

    Raises:
        ImportError: torchao is not installed (the message says how to install it).
    """

    config: Any = None
    module_filter_func: Callable[..., bool] | None = None
    pad_inner_dim: bool | None = env_field(_ENV_FP8 + "PAD_INNER_DIM", True, to_bool)
    enable_fsdp_float8_all_gather: bool | None = env_field(
        _ENV_FP8 + "ENABLE_FSDP_FLOAT8_ALL_GATHER", True, to_bool
    )

    def __post_init__(self) -> None:
        require("torchao", purpose="AORecipeKwargs (torchao FP8 training)")
        resolve_fields(self)
        if self.module_filter_func is not None and not callable(self.module_filter_func):
            raise ConfigurationError(
                f"module_filter_func={self.module_filter_func!r} must be a function (module, name) -> bool."
            )
        if self.config is None:
            from torchao.float8 import Float8LinearConfig

            self.config = Float8LinearConfig(
                pad_inner_dim=self.pad_inner_dim,
                enable_fsdp_float8_all_gather=self.enable_fsdp_float8_all_gather,
            )


_PROFILER_ACTIVITIES = ("cpu", "xpu", "mtia", "cuda", "hpu")


@dataclass
class ProfileKwargs(KwargsHandler):
    """Arguments for ``torch.profiler.profile``; :meth:`build` creates the profiler.

    Args:
        activities: what to record, among ``"cpu"``, ``"cuda"``, ``"xpu"``, ``"mtia"``, ``"hpu"``
            (``None``: torch's default, the CPU and the accelerator present).
        schedule_option: ``torch.profiler.schedule`` arguments (``wait``, ``warmup``, ``active``,
            ``repeat``, ``skip_first``, ...).
        on_trace_ready: called with the profiler each time the schedule completes a recording.
        output_trace_dir: where :meth:`export_trace` writes the Chrome trace of each process.
    """

    activities: list[str] | None = None
    schedule_option: dict[str, int] | None = None
    on_trace_ready: Callable[..., Any] | None = None
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    with_flops: bool = False
    with_modules: bool = False
    output_trace_dir: str | None = None

    def __post_init__(self) -> None:
        if self.activities is not None:
            bad = (
                [a for a in self.activities if a not in _PROFILER_ACTIVITIES]
                if isinstance(self.activities, (list, tuple))
                else [self.activities]
            )
            if bad:
                raise ConfigurationError(
                    f"activities={self.activities!r} has {bad}; each must be one of "
                    f"{list(_PROFILER_ACTIVITIES)}."
                )
        if self.schedule_option is not None:
            import torch.profiler

            accepted = list(inspect.signature(torch.profiler.schedule).parameters)
            unknown = sorted(set(self.schedule_option) - set(accepted))
            if unknown:
                raise ConfigurationError(
                    f"schedule_option has keys {unknown} that torch.profiler.schedule does not take; "
                    f"accepted: {accepted}."
                )
        _require_bool(self, "record_shapes", "profile_memory", "with_stack", "with_flops", "with_modules")

    def _activity(self, name: str) -> torch.profiler.ProfilerActivity:
        import torch

        available = {"cpu": True, "cuda": True}
        available["xpu"] = hasattr(torch, "xpu") and torch.xpu.is_available()
        available["mtia"] = hasattr(torch, "mtia") and torch.mtia.is_available()
        available["hpu"] = hasattr(torch, "hpu") and bool(torch.hpu.is_available())
        member = getattr(torch.profiler.ProfilerActivity, name.upper(), None)
        if member is None or not available.get(name):
            present = [key for key, ok in available.items() if ok]
            raise ConfigurationError(
                f"activities has {name!r}, which this machine cannot profile; use {present}."
            )
        return member

    def build(self) -> torch.profiler.profile:
        """A ``torch.profiler.profile`` with these settings (enter it with ``with``)."""
        import torch.profiler

        activities = None if self.activities is None else [self._activity(name) for name in self.activities]
        schedule = None if self.schedule_option is None else torch.profiler.schedule(**self.schedule_option)
        return torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self.on_trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
            with_flops=self.with_flops,
            with_modules=self.with_modules,
        )

    def export_trace(self, profiler: torch.profiler.profile, process_index: int = 0) -> str | None:
        """Write ``profiler``'s Chrome trace to ``output_trace_dir/profile_{process_index}.json``.

        Returns the path written, or ``None`` when ``output_trace_dir`` is unset. The file
        appears whole or not at all.
        """
        if self.output_trace_dir is None:
            return None
        os.makedirs(self.output_trace_dir, exist_ok=True)
        path = os.path.join(self.output_trace_dir, PROFILE_PATTERN_NAME.format(suffix=process_index))
        with atomic_path(path) as temporary:
            profiler.export_chrome_trace(str(temporary))
        return path
