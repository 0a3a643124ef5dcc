"""Preparing a model and its optimizer for FSDP2 (``torch.distributed.fsdp.fully_shard``).

What the ``Accelerator``'s FSDP2 engine does, step by step, under Accelerate's names:
``fsdp2_apply_ac`` (activation checkpointing on the blocks the wrap policy selects, before
sharding), ``fsdp2_prepare_model`` (upcast trainable weights to fp32 under mixed precision, shard
with the layout of :func:`~hasten.utils.dataclasses.plugins.fsdp_wrap.shard_fsdp2`, and with
``cpu_ram_efficient_loading`` broadcast rank 0's weights into the shards), then
``fsdp2_switch_optimizer_parameters`` (the optimizer built on the whole parameters now holds the
sharded ones).

Each function that takes ``accelerator`` reads only what the ``Accelerator``'s state holds
(``fsdp_plugin``, ``mixed_precision``, ``device``, ``is_main_process``, ``parallelism_config``), so
the ``Accelerator`` or its ``AcceleratorState`` may be passed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hasten.logging import get_logger
from hasten.utils.compilation import is_compiled_module
from hasten.utils.dataclasses.plugins.fsdp_wrap import (
    bind_auto_wrap_policy,
    checkpoint_blocks,
    fsdp2_blocks,
    modules_matching,
    modules_selected,
    shard_fsdp2,
)
from hasten.utils.errors import ConfigurationError
from hasten.utils.modeling import get_non_persistent_buffers
from hasten.utils.operations import broadcast_object_list

logger = get_logger(__name__)


def state_of(accelerator: Any) -> Any:
    """The ``AcceleratorState`` behind ``accelerator`` (an ``Accelerator``, or the state itself)."""
    return getattr(accelerator, "state", accelerator)


def _fsdp2_plugin(accelerator: Any) -> Any:
    plugin = getattr(state_of(accelerator), "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2:
        version = None if plugin is None else plugin.fsdp_version
        raise ConfigurationError(
            f"this needs an FSDP2 plugin on the accelerator's state, found "
            f"{'none' if plugin is None else f'fsdp_version={version}'}; pass "
            "fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2) to the Accelerator."
        )
    return plugin


def enable_fsdp_ram_efficient_loading() -> None:
    """Ask transformers to load pretrained weights on rank 0 only (the others get empty weights), by
    setting ``FSDP_CPU_RAM_EFFICIENT_LOADING`` (and ``ACCELERATE_USE_FSDP`` when unset)."""
    os.environ.setdefault("ACCELERATE_USE_FSDP", "True")
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "True"


def disable_fsdp_ram_efficient_loading() -> None:
    """Undo :func:`enable_fsdp_ram_efficient_loading`: every rank loads the weights."""
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "False"


def ensure_weights_retied(
    param_init_fn: Callable[[torch.nn.Module], Any], model: torch.nn.Module, device: torch.device
) -> Callable[[torch.nn.Module], Any]:
    """``param_init_fn`` made to keep the ties of ``model._tied_weights_keys``.

    An init function that re-allocates parameters (``to_empty``) breaks ties between modules;
    the returned function re-ties each parameter to the first tensor that replaced it.
    Without tied keys, ``param_init_fn`` is returned unchanged. ``device`` is accepted for
    Accelerate's signature.
    """
    tied_names = getattr(model, "_tied_weights_keys", None)
    if not tied_names:
        return param_init_fn
    replacement: dict[int, torch.nn.Parameter | None] = {}
    for name in tied_names:
        module_name, _, attribute = str(name).rpartition(".")
        replacement[id(getattr(model.get_submodule(module_name), attribute))] = None

    def init_keeping_ties(module: torch.nn.Module) -> Any:
        tied_here = [(n, id(p)) for n, p in module.named_parameters(recurse=False) if id(p) in replacement]
        result = param_init_fn(module)
        for attribute, key in tied_here:
            first = replacement[key]
            if first is None:
                replacement[key] = getattr(module, attribute)
            else:
                setattr(module, attribute, first)
        return result

    return init_keeping_ties


def _cast_like(full_sd: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``full_sd`` with floating tensors in the dtype the model holds them in (float8 kept)."""
    local = model.state_dict()
    cast = {}
    for key, value in full_sd.items():
        target = local.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(target, torch.Tensor)
            and value.is_floating_point()
            and value.dtype != target.dtype
            and "float8" not in str(value.dtype)
        ):
            value = value.to(target.dtype)
        cast[key] = value
    return cast


def fsdp2_load_full_state_dict(
    accelerator: Any, model: torch.nn.Module, full_sd: dict[str, Any], cpu_offload: bool = False
) -> torch.nn.Module:
    """Load a full state dict, read on rank 0 only, into the sharded ``model`` (in place).

    Rank 0 broadcasts each tensor and every rank keeps its shard; a model on ``meta`` gets
    its storage this way. Floating tensors take the model's dtype.

    Args:
        accelerator: the ``Accelerator`` (or its state).
        model: the model after ``fully_shard`` (on ``meta`` or materialised).
        full_sd: the whole state dict on rank 0 (what other ranks pass is ignored).
        cpu_offload: keep the shards on the CPU (with FSDP's CPU offload).

    Raises:
        KeyError: on every rank, when rank 0's ``full_sd`` lacks some of the model's keys (named).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    main = state_of(accelerator).is_main_process
    verdict: list[Any] = [sorted(set(model.state_dict()) - set(full_sd)) if main else None]
    if dist.is_available() and dist.is_initialized():
        broadcast_object_list(verdict)
    if verdict[0]:
        raise KeyError(
            f"the full state dict lacks {len(verdict[0])} of the model's keys: {verdict[0][:10]}"
            f"{' ...' if len(verdict[0]) > 10 else ''}; pass the state dict of this model (same names)."
        )
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=cpu_offload)
    set_model_state_dict(model, _cast_like(full_sd, model) if main else {}, options=options)
    return model


def _pointer(parameter: torch.Tensor) -> int:
    """The data pointer a parameter is known by: Accelerate replaces the optimizer's parameters by
    placeholders whose ``data_ptr`` attribute holds the original pointer."""
    if isinstance(parameter.data_ptr, int):
        return parameter.data_ptr
    local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
    return int(local.data_ptr())


def fsdp2_switch_optimizer_parameters(optimizer: torch.optim.Optimizer, mapping: dict[Any, Any]) -> None:
    """Make ``optimizer`` hold the sharded parameters in place of the whole ones.

    Args:
        optimizer: built on the model's parameters before sharding.
        mapping: old parameter -> new parameter; old ones given as the tensors themselves or as
            their data pointers (Accelerate's convention).

    Raises:
        KeyError: a parameter of the optimizer has no new parameter in ``mapping`` (named by group
            and position): training on would not update it.
        ValueError: the optimizer already has state for a parameter; switch before the first step.
    """
    by_tensor = {id(old): new for old, new in mapping.items() if isinstance(old, torch.Tensor)}
    by_pointer = {old: new for old, new in mapping.items() if isinstance(old, int)}
    for group_index, group in enumerate(optimizer.param_groups):
        switched = []
        for index, parameter in enumerate(group["params"]):
            new = by_tensor.get(id(parameter))
            if new is None:
                new = by_pointer.get(_pointer(parameter))
            if new is None:
                raise KeyError(
                    f"param_groups[{group_index}]['params'][{index}] (shape {tuple(parameter.shape)}) has no "
                    "sharded counterpart in mapping; map every parameter the optimizer holds (old -> new), "
                    "or "
                    "build the optimizer from the sharded model's parameters."
                )
            if optimizer.state.get(parameter):
                raise ValueError(
                    f"param_groups[{group_index}]['params'][{index}] already has optimizer state; its state "
                    "is "
                    "shaped like the whole parameter and cannot follow it to a shard. Switch parameters "
                    "before "
                    "the first step (or load the optimizer state after sharding)."
                )
            switched.append(new)
        group["params"] = switched


def fsdp2_prepare_auto_wrap_policy(
    fsdp2_plugin: Any, model: torch.nn.Module
) -> Callable[[torch.nn.Module], bool] | None:
    """Whether a module of ``model`` becomes its own FSDP2 group, as the plugin's wrap policy selects
    (``None`` when it selects none). A block wrapped for activation checkpointing counts through
    its wrapper.

    Raises:
        ConfigurationError: a transformer class name is not in the model (the message lists those that are).
    """
    if bind_auto_wrap_policy(fsdp2_plugin, model) is None:
        return None
    chosen = {id(module) for module in fsdp2_blocks(fsdp2_plugin, model)}

    def policy(module: torch.nn.Module) -> bool:
        return id(module) in chosen

    return policy


def fsdp2_apply_ac(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Wrap the blocks the wrap policy selects for activation checkpointing, in place (before sharding);
    with ``activation_checkpointing_offload`` the saved inputs wait on the CPU."""
    plugin = _fsdp2_plugin(accelerator)
    blocks = modules_selected(model, bind_auto_wrap_policy(plugin, model))
    checkpoint_blocks(model, blocks, offload=bool(plugin.activation_checkpointing_offload))
    return model


def get_fsdp2_grad_scaler(**kwargs: Any) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` built with ``kwargs`` (FSDP2's sharded gradients need no special scaler)."""
    return torch.amp.GradScaler(**kwargs)


def fsdp2_canonicalize_names(named_params: dict[str, Any]) -> dict[str, Any]:
    """``named_params`` under the names the model had before activation checkpointing and
    ``torch.compile`` inserted ``_checkpoint_wrapped_module`` and ``_orig_mod`` into them."""
    canonical = {}
    for name, value in named_params.items():
        name = name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")
        canonical[name.removeprefix("_orig_mod.")] = value
    return canonical


def get_parameters_from_modules(
    modules: Iterable[torch.nn.Module] | str | None, model: torch.nn.Module, device: Any
) -> set[torch.nn.Parameter]:
    """The parameters of ``modules`` (modules, or a regular expression over ``model``'s module names;
    modules found by name are moved to ``device`` first)."""
    found = modules_matching(modules, model)
    if isinstance(modules, str):
        for module in found:
            module.to(device)
    return {parameter for module in found for parameter in module.parameters()}


def _fsdp_mesh(accelerator: Any) -> Any:
    """The mesh FSDP shards over: the ``dp_shard_cp`` (and ``dp_replicate``) dimensions of the job's mesh."""
    config = getattr(state_of(accelerator), "parallelism_config", None)
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is None and config is not None:
        mesh = config.device_mesh
    if mesh is None or config is None:
        return mesh
    return config._submesh(config.fsdp_dim_names, mesh)


def _bnb_4bit(model: torch.nn.Module) -> tuple[bool, set[torch.nn.Parameter]]:
    """Whether ``model`` has bitsandbytes 4-bit weights, and those FSDP cannot shard (frozen, integer)."""
    found = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    frozen = {p for p in found if not p.requires_grad and not p.is_floating_point() and not p.is_complex()}
    return bool(found), frozen


def _upcast_trainable(model: torch.nn.Module, main: bool) -> None:
    """Trainable weights to fp32 (FSDP2 needs one dtype per group; the policy casts for compute)."""
    upcast = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.to(torch.float32)
            upcast.append(name)
    if upcast and main:
        logger.info(
            f"FSDP2 with mixed precision: {len(upcast)} trainable parameters upcast to fp32: {upcast[:10]}"
        )


def _non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers left out of ``state_dict`` (they must survive the move to ``meta``)."""
    names = get_non_persistent_buffers(model, recurse=True, fqns=True)
    return {name: buffer.clone() for name, buffer in model.named_buffers() if name in names}


def _tie_weights(model: torch.nn.Module) -> None:
    """Re-tie shared weights the way transformers models do, when the model can."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def fsdp2_prepare_model(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 as the accelerator's plugin says, in place; returns it.

    A model already sharded (or compiled around a sharded one) is returned as it is. With
    ``cpu_ram_efficient_loading``, only rank 0's weights count: the model moves to ``meta``, is
    sharded there, and rank 0's values are broadcast into the shards.

    Raises:
        ConfigurationError: the state has no FSDP2 plugin, or a transformer class name is not in the model.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    if isinstance(model, FSDPModule) or (
        is_compiled_module(model) and isinstance(model._orig_mod, FSDPModule)
    ):
        return model
    state = state_of(accelerator)
    plugin = _fsdp2_plugin(accelerator)
    plugin.set_auto_wrap_policy(model)
    ignored = get_parameters_from_modules(plugin.ignored_modules, model, state.device)
    has_4bit, frozen_4bit = _bnb_4bit(model)
    if frozen_4bit:
        ignored |= frozen_4bit
        if state.is_main_process:
            warnings.warn(
                f"{len(frozen_4bit)} frozen bitsandbytes 4-bit weights are left out of FSDP sharding (their "
                "uint8 "
                "storage cannot become a DTensor); set bnb_4bit_quant_storage to a float dtype to shard "
                "them.",
                UserWarning,
                stacklevel=2,
            )
    if state.mixed_precision != "no" and not has_4bit:
        _upcast_trainable(model, state.is_main_process)
    ram_efficient = bool(plugin.cpu_ram_efficient_loading) and not has_4bit
    if ram_efficient:
        original_sd = model.state_dict()
        buffers = _non_persistent_buffers(model)
        model = model.to(torch.device("meta"))
        _tie_weights(model)
    shard_fsdp2(plugin, model, mesh=_fsdp_mesh(accelerator), ignored_params=ignored or None)
    if ram_efficient:
        fsdp2_load_full_state_dict(
            accelerator, model, original_sd, cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy)
        )
        for fqn, buffer in buffers.items():
            owner, _, name = fqn.rpartition(".")
            model.get_submodule(owner).register_buffer(name, buffer.to(state.device), persistent=False)
        _tie_weights(model)
    return model
