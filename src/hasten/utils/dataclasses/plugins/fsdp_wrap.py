"""Applying a :class:`FullyShardedDataParallelPlugin` to a model with the real ``torch.distributed.fsdp`` API.

The wrap policy is resolved against the model itself: transformer block classes are
looked up by name among the model's modules (a name that is not there is an error listing
the classes that are), and size-based wrapping counts parameters bottom-up the way FSDP1
does. FSDP1 wraps with ``FullyShardedDataParallel(auto_wrap_policy=...)``; FSDP2 calls
``fully_shard`` on each module the same policy selects, innermost first, then on the embeddings
and output head, then on the root (:func:`shard_fsdp2`, which ``fsdp2_prepare_model`` uses too).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
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


def modules_matching(
    modules: Iterable[torch.nn.Module] | str | None, model: torch.nn.Module
) -> list[torch.nn.Module]:
    """``modules`` as a list: given as modules, or as a regular expression matched against the full
    names of ``model``'s submodules."""
    if modules is None:
        return []
    if isinstance(modules, str):
        pattern = re.compile(modules)
        return [module for name, module in model.named_modules() if name and pattern.fullmatch(name)]
    return list(modules)


def _ignored_modules(
    plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module
) -> list[torch.nn.Module] | None:
    ignored = plugin.ignored_modules
    return None if ignored is None else modules_matching(ignored, model)


def checkpoint_blocks(
    model: torch.nn.Module, blocks: Iterable[torch.nn.Module], offload: bool = False
) -> None:
    """Wrap each of ``blocks`` (submodules of ``model``) in place so that backward recomputes its
    activations; with ``offload``, what the checkpoint keeps for the recompute waits on the CPU."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
        offload_wrapper,
    )

    def wrapper(module: torch.nn.Module) -> torch.nn.Module:
        wrapped = checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        return offload_wrapper(wrapped) if offload else wrapped

    targets = {id(block) for block in blocks}
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: id(m) in targets)


def require_fsdp1_device() -> None:
    """Refuse FSDP1 on a machine without an accelerator, where torch cannot run it.

    Raises:
        ConfigurationError: this machine has no accelerator.
    """
    if accelerator_type() == "cpu":
        raise ConfigurationError(
            f"fsdp_version=1 (FullyShardedDataParallel) needs an accelerator in torch {torch.__version__}, "
            "and "
            "this machine has none; use fsdp_version=2 (fully_shard), which runs on CPU with gloo."
        )


def wrap_model(plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module) -> Any:
    """Shard ``model`` on the default process group as ``plugin`` says; FSDP2 shards it in place.

    Raises:
        ConfigurationError: a transformer class name is not in the model, or FSDP1 on a machine
            without an accelerator.
        RuntimeError: no process group is initialised (create the state first).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "FSDP needs a process group; create PartialState() (or the Accelerator) under a launcher first."
        )
    if plugin.fsdp_version == 2:
        if plugin.activation_checkpointing:
            checkpoint_blocks(
                model,
                modules_selected(model, bind_auto_wrap_policy(plugin, model)),
                offload=bool(plugin.activation_checkpointing_offload),
            )
        ignored = _ignored_modules(plugin, model)
        ignored_params = None if ignored is None else {p for module in ignored for p in module.parameters()}
        return shard_fsdp2(plugin, model, ignored_params=ignored_params)
    from torch.distributed.fsdp import FullyShardedDataParallel

    require_fsdp1_device()
    policy = bind_auto_wrap_policy(plugin, model)
    wrapped = FullyShardedDataParallel(
        model,
        sharding_strategy=plugin.sharding_strategy,
        cpu_offload=plugin.cpu_offload,
        auto_wrap_policy=policy,
        backward_prefetch=plugin.backward_prefetch,
        mixed_precision=plugin.mixed_precision_policy,
        ignored_modules=_ignored_modules(plugin, model),
        param_init_fn=plugin.param_init_fn,
        sync_module_states=bool(plugin.sync_module_states),
        forward_prefetch=bool(plugin.forward_prefetch),
        limit_all_gathers=plugin.limit_all_gathers,
        use_orig_params=bool(plugin.use_orig_params),
    )
    if plugin.activation_checkpointing:
        inner = [m for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel) and m is not wrapped]
        checkpoint_blocks(wrapped, inner)
    return wrapped


def fsdp2_blocks(plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules FSDP2 shards as their own groups, innermost first: those the wrap policy selects,
    each taken with the activation-checkpoint wrapper around it when it has one."""
    selected = modules_selected(model, bind_auto_wrap_policy(plugin, model))
    wrappers = {
        id(inner): module
        for module in model.modules()
        if (inner := getattr(module, "_checkpoint_wrapped_module", None)) is not None
    }
    blocks: list[torch.nn.Module] = []
    for module in selected:
        while id(module) in wrappers:
            module = wrappers[id(module)]
        if module is not model and all(module is not block for block in blocks):
            blocks.append(module)
    return blocks


def _final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The last child of the base model whose class name says it is a norm (``model.norm``, ``ln_f``)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else model
    if not isinstance(base, torch.nn.Module):
        return None
    norms = [module for module in base.children() if "Norm" in type(module).__name__]
    return norms[-1] if norms else None


def shard_fsdp2(
    plugin: FullyShardedDataParallelPlugin,
    model: torch.nn.Module,
    mesh: Any = None,
    ignored_params: set[torch.nn.Parameter] | None = None,
) -> torch.nn.Module:
    """Apply ``fully_shard`` to ``model`` in place, the layout FSDP2 training uses.

    Groups: each block of :func:`fsdp2_blocks`; the input embedding (unless tied to the output
    head); the tail (final norm and output head, with the input embedding when tied), kept
    gathered after forward since backward starts there; then the root, whose
    ``reshard_after_forward`` torch chooses.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": plugin.cpu_offload,
        "mesh": mesh,
    }
    if ignored_params:
        options["ignored_params"] = ignored_params
    for block in fsdp2_blocks(plugin, model):
        if not isinstance(block, FSDPModule):
            fully_shard(block, **options)
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    tied = embed is not None and getattr(embed, "weight", None) is getattr(head, "weight", False)
    if embed is not None and not tied and not isinstance(embed, FSDPModule):
        fully_shard(embed, **options)
    tail_modules = [_final_norm(model), embed, head] if tied else [_final_norm(model), head]
    tail = [m for m in tail_modules if isinstance(m, torch.nn.Module) and not isinstance(m, FSDPModule)]
    if tail:
        fully_shard(tail, **{**options, "reshard_after_forward": False})
    if not isinstance(model, FSDPModule):
        fully_shard(model, **{key: value for key, value in options.items() if key != "reshard_after_forward"})
    return model
