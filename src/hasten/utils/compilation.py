"""``torch.compile`` applied to a whole model or to its repeated blocks (regional compilation).

A transformer repeats one block class many times (``model.layers[i]``). Compiling each block
separately lets every block after the first hit the compiler's cache, so cold starts take a
fraction of the time a whole-model compile takes. A *repeated block* is a non-empty
``nn.ModuleList`` whose items all have the first item's class.

Three ways to apply it, for three callers:

- :func:`compile_regions` returns a new model whose regions are ``torch.compile`` wrappers and
  leaves ``model`` untouched (it is kept as ``_orig_mod`` to unwrap later);
- :func:`compile_regions_fsdp2` and :func:`compile_regions_deepspeed` compile in place with
  ``Module.compile()``, which keeps ``nn.Module.__call__`` on the call path, so hooks that FSDP2 or
  DeepSpeed install afterwards still run.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, TypeGuard

import torch
from torch import nn


def _optimized_module_type() -> type | None:
    dynamo = getattr(torch, "_dynamo", None)
    return getattr(getattr(dynamo, "eval_frame", None), "OptimizedModule", None)


def is_compiled_module(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile`` returns (an ``OptimizedModule``)."""
    optimized = _optimized_module_type()
    return optimized is not None and isinstance(module, optimized)


def has_compiled_regions(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is a ``torch.compile`` wrapper."""
    optimized = _optimized_module_type()
    return optimized is not None and any(isinstance(sub, optimized) for sub in module.modules())


def is_repeated_blocks(module: nn.Module) -> TypeGuard[nn.ModuleList]:
    """Whether ``module`` is a non-empty ``nn.ModuleList`` whose items all share the first item's class."""
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = type(module[0])
    return all(isinstance(item, first) for item in module)


def has_repeated_blocks(module: nn.Module) -> bool:
    """Whether ``module`` holds repeated blocks at any depth (itself included)."""
    return any(is_repeated_blocks(sub) for sub in module.modules())


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new instance of ``module``'s class sharing its attributes, with its own child table.

    Methods bound to ``module`` that were stored on the instance are re-bound to the copy.
    """
    copy = module.__class__.__new__(module.__class__)
    copy.__dict__.update(module.__dict__)
    for name, value in list(copy.__dict__.items()):
        if isinstance(value, MethodType) and value.__self__ is module:
            copy.__dict__[name] = MethodType(value.__func__, copy)
    copy._modules = {}
    return copy


def _compiled_copy(module: nn.Module, compile_kwargs: dict[str, Any]) -> nn.Module:
    if is_repeated_blocks(module):
        return nn.ModuleList(torch.compile(block, **compile_kwargs) for block in module)  # type: ignore[misc]
    if has_repeated_blocks(module):
        copy = _shallow_copy(module)
        for name, child in module.named_children():
            copy.add_module(name, _compiled_copy(child, compile_kwargs))
        return copy
    compiled: nn.Module = torch.compile(module, **compile_kwargs)  # type: ignore[assignment]
    return compiled


def compile_regions(module: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """A copy of ``module`` in which each repeated block, and each part outside them, is compiled
    separately (``compile_kwargs`` go to ``torch.compile``).

    ``module`` itself is not changed; the result keeps it as ``_orig_mod``, which
    ``extract_model_from_parallel`` uses to unwrap. Parameters are shared, not copied.
    """
    result = _compiled_copy(module, compile_kwargs)
    if "_orig_mod" not in result.__dict__:
        result.__dict__["_orig_mod"] = module
    return result


def _compile_in_place(module: nn.Module, compile_kwargs: dict[str, Any]) -> None:
    if is_repeated_blocks(module):
        for block in module:
            block.compile(**compile_kwargs)
    elif has_repeated_blocks(module):
        for child in module.children():
            _compile_in_place(child, compile_kwargs)
    else:
        module.compile(**compile_kwargs)


def compile_regions_fsdp2(module: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Regional compilation in place with ``Module.compile()``, so hooks that ``fully_shard`` adds later
    still run; returns ``module``."""
    _compile_in_place(module, compile_kwargs)
    return module


def compile_regions_deepspeed(module: nn.Module, **compile_kwargs: Any) -> None:
    """Regional compilation in place with ``Module.compile()``, for the model inside a DeepSpeed engine
    (whose hooks and offloaded parameters a ``torch.compile`` wrapper would bypass)."""
    _compile_in_place(module, compile_kwargs)
