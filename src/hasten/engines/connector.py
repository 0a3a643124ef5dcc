"""Resolving the ``Accelerator``'s arguments once: the shared state, a frozen :class:`Settings`, one
engine and one precision.

Everything the constructor accepts is checked here, before any process group is formed: types,
mutually exclusive arguments, ``ACCELERATE_*`` fallbacks, engines hasten does not run. What
the per-step methods need is then decided, so they never look again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hasten.engines.base import Engine
from hasten.engines.ddp import DDPEngine
from hasten.engines.deepspeed import DeepSpeedEngine
from hasten.engines.fsdp2 import FSDP2Engine
from hasten.engines.plugins import resolve_plugins, set_plugin_precision
from hasten.engines.precision import Precision
from hasten.engines.single import SingleDeviceEngine
from hasten.state import AcceleratorState, GradientState, PartialState
from hasten.utils.dataclasses._env import positive_int, read_env
from hasten.utils.dataclasses.enums import (
    DistributedType,
    DynamoBackend,
    FP8BackendType,
    PrecisionType,
    RNGType,
)
from hasten.utils.dataclasses.kwargs import (
    AutocastKwargs,
    DistributedDataParallelKwargs,
    FP8RecipeKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    KwargsHandler,
    ProfileKwargs,
)
from hasten.utils.dataclasses.plugins.dynamo import TorchDynamoPlugin
from hasten.utils.dataclasses.plugins.gradient import GradientAccumulationPlugin
from hasten.utils.dataclasses.plugins.megatron import MegatronLMPlugin
from hasten.utils.environment import parse_flag_from_env
from hasten.utils.errors import ConfigurationError

# The engine for each distributed type.
ENGINES: dict[DistributedType, type[Engine]] = {
    DistributedType.NO: SingleDeviceEngine,
    DistributedType.FSDP: FSDP2Engine,
    DistributedType.DEEPSPEED: DeepSpeedEngine,
    **dict.fromkeys(
        [
            DistributedType.MULTI_CPU,
            DistributedType.MULTI_GPU,
            DistributedType.MULTI_XPU,
            DistributedType.MULTI_NPU,
            DistributedType.MULTI_MLU,
            DistributedType.MULTI_SDAA,
            DistributedType.MULTI_MUSA,
            DistributedType.MULTI_HPU,
            DistributedType.MULTI_NEURON,
        ],
        DDPEngine,
    ),
}


@dataclass(frozen=True)
class Handlers:
    """The kwargs handlers passed to the ``Accelerator``, at most one of each kind."""

    ddp: DistributedDataParallelKwargs | None = None
    scaler: GradScalerKwargs | None = None
    init: InitProcessGroupKwargs | None = None
    fp8_recipe: FP8RecipeKwargs | None = None
    autocast: AutocastKwargs | None = None
    profile: ProfileKwargs | None = None


_HANDLER_FIELDS: tuple[tuple[type[KwargsHandler], str], ...] = (
    (DistributedDataParallelKwargs, "ddp"),
    (GradScalerKwargs, "scaler"),
    (InitProcessGroupKwargs, "init"),
    (FP8RecipeKwargs, "fp8_recipe"),
    (AutocastKwargs, "autocast"),
    (ProfileKwargs, "profile"),
)


@dataclass(frozen=True)
class Settings:
    """What the ``Accelerator`` decided at construction; per-step code only reads it."""

    distributed_type: DistributedType
    device: torch.device
    num_processes: int
    process_index: int
    local_process_index: int
    use_distributed: bool
    mixed_precision: PrecisionType
    handlers: Handlers
    dynamo_plugin: TorchDynamoPlugin
    rng_types: tuple[RNGType, ...]
    bypass_device_map: bool
    fp8_backend: FP8BackendType

    @property
    def compiles(self) -> bool:
        """Whether prepared models go through ``torch.compile``."""
        return self.dynamo_plugin.backend != DynamoBackend.NO


@dataclass(frozen=True)
class Connection:
    """The state, settings, engine and precision one ``Accelerator`` runs with."""

    state: AcceleratorState
    gradient_state: GradientState
    settings: Settings
    engine: Engine
    precision: Precision


def sort_handlers(kwargs_handlers: Sequence[Any] | None) -> Handlers:
    """One :class:`Handlers` from the ``kwargs_handlers`` list.

    Raises:
        TypeError: an item is not a kwargs handler the ``Accelerator`` uses.
        ConfigurationError: two handlers of one kind.
    """
    if kwargs_handlers is None:
        return Handlers()
    if not isinstance(kwargs_handlers, (list, tuple)):
        raise TypeError(
            f"kwargs_handlers={kwargs_handlers!r} must be a list of kwargs handlers, e.g. "
            "[DistributedDataParallelKwargs(find_unused_parameters=True)]."
        )
    known = ", ".join(cls.__name__ for cls, _ in _HANDLER_FIELDS)
    found: dict[str, KwargsHandler] = {}
    for position, handler in enumerate(kwargs_handlers):
        name = next((field for cls, field in _HANDLER_FIELDS if isinstance(handler, cls)), None)
        if name is None:
            raise TypeError(
                f"kwargs_handlers[{position}] is a {type(handler).__qualname__}; the Accelerator uses "
                f"{known}."
            )
        if name in found:
            raise ConfigurationError(
                f"kwargs_handlers holds two {type(handler).__name__} objects ({found[name]!r} and "
                f"{handler!r}); pass one, with every setting in it."
            )
        found[name] = handler
    return Handlers(**found)  # type: ignore[arg-type]


def _dynamo(dynamo_backend: Any, dynamo_plugin: Any) -> TorchDynamoPlugin:
    if dynamo_plugin is not None and dynamo_backend is not None:
        raise ConfigurationError(
            f"dynamo_backend={dynamo_backend!r} and dynamo_plugin={dynamo_plugin!r} were both passed; pass "
            "one (the backend goes in TorchDynamoPlugin(backend=...))."
        )
    if dynamo_plugin is None:
        return TorchDynamoPlugin() if dynamo_backend is None else TorchDynamoPlugin(backend=dynamo_backend)
    if not isinstance(dynamo_plugin, TorchDynamoPlugin):
        raise TypeError(f"dynamo_plugin must be a TorchDynamoPlugin, got {type(dynamo_plugin).__qualname__}.")
    return dynamo_plugin


def _require_type(value: Any, cls: type, name: str) -> None:
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__qualname__}.")


def _refuse_engines_not_built(megatron_lm_plugin: Any, parallel: Any) -> None:
    """The engines hasten does not run: a clear error before any process group is formed."""
    if megatron_lm_plugin is not None or parse_flag_from_env("ACCELERATE_USE_MEGATRON_LM"):
        raise ConfigurationError(
            "Megatron-LM was requested (megatron_lm_plugin or ACCELERATE_USE_MEGATRON_LM), but hasten does "
            "not run Megatron-LM: it needs NVIDIA GPUs and Apex and cannot be installed here. Use DDP (the "
            "default on several processes) instead."
        )
    if parallel is not None or parse_flag_from_env("ACCELERATE_USE_PARALLELISM_CONFIG"):
        raise ConfigurationError(
            "Tensor / context / n-D parallelism was requested (torch_tp_plugin, parallelism_config or "
            "ACCELERATE_USE_PARALLELISM_CONFIG), but hasten has no such engine. Use DDP (the default on "
            "several processes) instead."
        )


def _require_process_group(state: PartialState, engine: str) -> None:
    """FSDP2 and DeepSpeed shard over a process group, which a launcher forms (one process included)."""
    if state.backend is None:
        raise ConfigurationError(
            f"The {engine} engine needs a process group, and this process was not started by a launcher. "
            f"Run it with `hasten launch --num_processes N script.py` (N may be 1) or torchrun."
        )


def _accumulation(steps: Any, plugin: Any) -> GradientAccumulationPlugin:
    if plugin is not None:
        _require_type(plugin, GradientAccumulationPlugin, "gradient_accumulation_plugin")
        if steps != 1:
            raise ConfigurationError(
                f"gradient_accumulation_steps={steps!r} and gradient_accumulation_plugin were both passed; "
                "pass only the plugin, with num_steps set in it."
            )
        return plugin
    number = positive_int(steps, "gradient_accumulation_steps")
    raw = read_env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if number == 1 and raw is not None:
        number = positive_int(raw, "environment variable ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    return GradientAccumulationPlugin(num_steps=number)


def _rng_types(rng_types: Any) -> tuple[RNGType, ...]:
    if rng_types is None:
        return (RNGType.GENERATOR,)
    if isinstance(rng_types, (str, RNGType)) or not isinstance(rng_types, (list, tuple)):
        raise TypeError(
            f"rng_types={rng_types!r} must be a list, e.g. ['generator'] or ['torch', 'generator']."
        )
    return tuple(RNGType.parse(value, f"rng_types[{i}]") for i, value in enumerate(rng_types))


def _refuse_conflicts(state: AcceleratorState, dynamo: TorchDynamoPlugin, dynamo_given: bool) -> None:
    """A second ``Accelerator`` shares the first one's state: settings it cannot change are refused."""
    live = state.dynamo_plugin
    if dynamo_given and live is not None and live != dynamo:
        raise ConfigurationError(
            f"This process's AcceleratorState compiles with {live!r}; a second Accelerator asked for "
            f"{dynamo!r}. An Accelerator shares the state of the first one: pass the same dynamo settings "
            "(or none)."
        )


def connect(
    *,
    mixed_precision: Any,
    cpu: bool,
    gradient_accumulation_steps: Any,
    gradient_accumulation_plugin: Any,
    deepspeed_plugin: Any,
    deepspeed_plugins: Any,
    fsdp_plugin: Any,
    torch_tp_plugin: Any,
    megatron_lm_plugin: Any,
    parallelism_config: Any,
    kwargs_handlers: Any,
    dynamo_backend: Any,
    dynamo_plugin: Any,
    rng_types: Any,
) -> Connection:
    """Check and resolve the ``Accelerator``'s arguments, join the state, choose engine and precision.

    Raises:
        TypeError: an argument has the wrong type.
        ConfigurationError: a value is invalid, two arguments exclude each other, the engine asked
            for is not available, or a second ``Accelerator`` asks for what the shared state cannot change.
    """
    precision_mode = (
        None if mixed_precision is None else PrecisionType.parse(mixed_precision, "mixed_precision")
    )
    handlers = sort_handlers(kwargs_handlers)
    if handlers.fp8_recipe is not None:
        raise ConfigurationError(
            "kwargs_handlers holds an FP8RecipeKwargs, but FP8 training needs TransformerEngine or MS-AMP "
            "on NVIDIA GPUs, which hasten does not drive. Drop it (and use mixed_precision='bf16')."
        )
    dynamo = _dynamo(dynamo_backend, dynamo_plugin)
    _require_type(megatron_lm_plugin, MegatronLMPlugin, "megatron_lm_plugin")
    parallel = parallelism_config if parallelism_config is not None else torch_tp_plugin
    _refuse_engines_not_built(megatron_lm_plugin, parallel)
    plugins = resolve_plugins(deepspeed_plugin, deepspeed_plugins, fsdp_plugin)
    accumulation = _accumulation(gradient_accumulation_steps, gradient_accumulation_plugin)
    rng = _rng_types(rng_types)
    if not isinstance(cpu, bool):
        raise TypeError(f"cpu={cpu!r} must be True or False.")

    live = AcceleratorState._accelerator is not None
    dynamo_given = dynamo_plugin is not None or dynamo_backend is not None
    init = {} if handlers.init is None else handlers.init.to_kwargs()
    if plugins.deepspeed is not None or plugins.fsdp is not None:
        _require_process_group(PartialState(cpu, **init), "DeepSpeed" if plugins.deepspeed else "FSDP2")
    state = AcceleratorState(
        mixed_precision=None if precision_mode is None else precision_mode.value,
        cpu=cpu,
        dynamo_plugin=dynamo if dynamo_given or not live else None,  # a later default asks for nothing
        deepspeed_plugin=plugins.deepspeed,
        fsdp_plugin=plugins.fsdp,
        _from_accelerator=True,
        **init,
    )
    if live:
        _refuse_conflicts(state, dynamo, dynamo_given)
    gradient_state = GradientState(accumulation)
    engine_class = ENGINES.get(state.distributed_type)
    if engine_class is None:  # only reachable through a state made elsewhere (e.g. XLA)
        raise ConfigurationError(
            f"The live AcceleratorState runs {state.distributed_type.value}, which hasten has no engine for; "
            f"it runs {sorted(t.value for t in ENGINES)}."
        )
    trains_in = set_plugin_precision(plugins, PrecisionType(state.mixed_precision))
    precision = Precision(
        PrecisionType(state.mixed_precision),
        state.device,
        # FSDP2's gradients are DTensors that torch's plain scaler handles (FSDP1 needed a sharded one)
        DistributedType.NO if engine_class is FSDP2Engine else state.distributed_type,
        engine_casts=engine_class.casts_itself,
        autocast_handler=handlers.autocast,
        scaler_handler=handlers.scaler,
    )
    settings = Settings(
        distributed_type=state.distributed_type,
        device=state.device,
        num_processes=state.num_processes,
        process_index=state.process_index,
        local_process_index=state.local_process_index,
        use_distributed=state.use_distributed,
        mixed_precision=trains_in,
        handlers=handlers,
        dynamo_plugin=state.dynamo_plugin or dynamo,
        rng_types=rng,
        bypass_device_map=parse_flag_from_env("ACCELERATE_BYPASS_DEVICE_MAP"),
        fp8_backend=FP8BackendType.parse(
            read_env("ACCELERATE_FP8_BACKEND") or "NO", "ACCELERATE_FP8_BACKEND"
        ),
    )
    return Connection(state, gradient_state, settings, engine_class(settings, precision), precision)
