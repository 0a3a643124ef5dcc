"""Applying a :class:`FullyShardedDataParallelPlugin` to a model with the real ``torch.distributed.fsdp`` API.

The wrap policy is resolved against the model itself: transformer block classes are
looked up by name among the model's modules (a name that is not there is an error listing
the classes that are), and size-based wrapping counts parameters bottom-up the way FSDP1
does. FSDP1 wraps with ``FullyShardedDataParallel(auto_wrap_policy=...)``; FSDP2 calls
``fully_shard`` on each module the same policy selects, innermost first, then on the root.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from hasten.utils.device import accelerator_type
from hasten.utils.errors import ConfigurationError

if TYPE_CHECKING:
    from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin


def get_module_class_from_name(module: torch.nn.Module, name: str) -> type[torch.nn.Module] | None:
    """The class of the first module in ``module`` (itself included) whose class is called ``name``."""
    for submodule in module.modules():
        if type(submodule).__name__ == name:
            return type(submodule)
    return None


def _transformer_classes(
    plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module
) -> set[type[torch.nn.Module]]:
    names = plugin.transformer_cls_names_to_wrap
    if names is None:
        names = list(getattr(model, "_no_split_modules", None) or [])
        plugin.transformer_cls_names_to_wrap = names
    classes = set()
    for name in names:
        found = get_module_class_from_name(model, name)
        if found is None:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigurationError(
                f"transformer_cls_names_to_wrap has {name!r}, but the model has no module of that class; "
                f"its classes are {present}. Fix the name (it is case-sensitive) or "
                "FSDP_TRANSFORMER_CLS_TO_WRAP."
            )
        classes.add(found)
    return classes


def bind_auto_wrap_policy(
    plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module
) -> Callable[..., bool] | None:
    """The plugin's wrap policy with its arguments bound for ``model`` (``None``: wrap the root only)."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if policy is transformer_auto_wrap_policy:
        return functools.partial(policy, transformer_layer_cls=_transformer_classes(plugin, model))
    if policy is size_based_auto_wrap_policy:
        if not plugin.min_num_params:
            return None
        return functools.partial(policy, min_num_params=plugin.min_num_params)
    return policy


def modules_selected(model: torch.nn.Module, policy: Callable[..., bool] | None) -> list[torch.nn.Module]:
    """The submodules (not the root) ``policy`` wraps, innermost first, as FSDP1's auto-wrap would choose
    them.

    A module's count of unwrapped parameters excludes those of its wrapped descendants.
    """
    if policy is None:
        return []
    chosen: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> int:
        unwrapped = sum(p.numel() for p in module.parameters(recurse=False))
        unwrapped += sum(visit(child) for child in module.children())
        if module is not model and policy(module=module, recurse=False, nonwrapped_numel=unwrapped):
            chosen.append(module)
            return 0
        return unwrapped

    visit(model)
    return chosen


def _ignored_modules(
    plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module
) -> list[torch.nn.Module] | None:
    ignored = plugin.ignored_modules
    if ignored is None:
        return None
    if isinstance(ignored, str):
        pattern = re.compile(ignored)
        return [module for name, module in model.named_modules() if name and pattern.fullmatch(name)]
    return list(ignored)


def _checkpoint_activations(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    targets = {id(block) for block in blocks}
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda module: id(module) in targets,
    )


def wrap_model(plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module) -> Any:
    """Shard ``model`` on the default process group as ``plugin`` says; FSDP2 shards it in place.

    Raises:
        ConfigurationError: a transformer class name is not in the model.
        RuntimeError: no process group is initialised (create the state first).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "FSDP needs a process group; create PartialState() (or the Accelerator) under a launcher first."
        )
    policy = bind_auto_wrap_policy(plugin, model)
    ignored = _ignored_modules(plugin, model)
    blocks = modules_selected(model, policy)
    if plugin.fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if accelerator_type() == "cpu":
            raise ConfigurationError(
                "fsdp_version=1 (FullyShardedDataParallel) needs an accelerator in torch "
                f"{torch.__version__}, and "
                "this machine has none; use fsdp_version=2 (fully_shard), which runs on CPU with gloo."
            )

        wrapped = FullyShardedDataParallel(
            model,
            sharding_strategy=plugin.sharding_strategy,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=policy,
            backward_prefetch=plugin.backward_prefetch,
            mixed_precision=plugin.mixed_precision_policy,
            ignored_modules=ignored,
            param_init_fn=plugin.param_init_fn,
            sync_module_states=bool(plugin.sync_module_states),
            forward_prefetch=bool(plugin.forward_prefetch),
            limit_all_gathers=plugin.limit_all_gathers,
            use_orig_params=bool(plugin.use_orig_params),
        )
        if plugin.activation_checkpointing:
            _checkpoint_activations(
                wrapped,
                [
                    m
                    for m in wrapped.modules()
                    if isinstance(m, FullyShardedDataParallel) and m is not wrapped
                ],
            )
        return wrapped
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if plugin.activation_checkpointing:
        _checkpoint_activations(model, blocks)
        blocks = modules_selected(model, _wrappers_of(blocks))
    ignored_params = None if ignored is None else {p for module in ignored for p in module.parameters()}
    options: dict[str, Any] = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": plugin.cpu_offload,
        "ignored_params": ignored_params,
    }
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def _wrappers_of(blocks: list[torch.nn.Module]) -> Callable[..., bool]:
    """A policy selecting the checkpoint wrappers that now hold ``blocks``."""
    targets = {id(block) for block in blocks}

    def policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        inner = getattr(module, "_checkpoint_wrapped_module", None)
        return inner is not None and id(inner) in targets

    return policy
