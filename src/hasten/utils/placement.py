"""Put tensors into modules: place, replace or fill a module's parameters and buffers, and re-tie them.

:func:`set_module_tensor_to_device` is what loading, offload hooks and quantization use to give a
module its weights. A tensor that already holds memory on the target device, in the target dtype,
is filled in place (its identity, and so optimizers and ties built on it, survive); a ``meta``
tensor, or one moving to another device or dtype, is replaced.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import nn

from hasten.utils.memory import clear_device_cache
from hasten.utils.modeling import DtypeLike, as_torch_dtype, keeps_own_dtype, value_dtype
from hasten.utils.typing import Device


def _owner(model: nn.Module, tensor_name: str) -> tuple[nn.Module, str]:
    """The module holding ``tensor_name`` (a dotted path) and the tensor's own name."""
    path, _, leaf = tensor_name.rpartition(".")
    module = model
    if path:
        for part in path.split("."):
            child = module._modules.get(part)
            if child is None:
                raise ValueError(
                    f"tensor_name={tensor_name!r}: {type(module).__name__} has no submodule {part!r} "
                    f"(its children are {list(module._modules)})"
                )
            module = child
    return module, leaf


def module_tensor(model: nn.Module, tensor_name: str) -> torch.Tensor:
    """The parameter or buffer ``tensor_name`` (a dotted path) of ``model``.

    Raises:
        ValueError: there is no such tensor.
    """
    return _slot(model, tensor_name)[3]


def _slot(model: nn.Module, tensor_name: str) -> tuple[nn.Module, str, bool, torch.Tensor]:
    """The module holding ``tensor_name``, the tensor's own name, whether it is a buffer, and the tensor."""
    owner, leaf = _owner(model, tensor_name)
    is_buffer = leaf in owner._buffers
    if leaf not in owner._parameters and not is_buffer:
        raise ValueError(
            f"tensor_name={tensor_name!r}: {type(owner).__name__} has no parameter or buffer {leaf!r} "
            f"(it has parameters {list(owner._parameters)} and buffers {list(owner._buffers)})"
        )
    found = owner._buffers[leaf] if is_buffer else owner._parameters[leaf]
    if found is None:
        raise ValueError(f"tensor_name={tensor_name!r} is registered as None; there is no tensor to place")
    return owner, leaf, is_buffer, found


def retie_parameters(model: nn.Module, tied_params: list[list[str]]) -> None:
    """Point every name of each tied group at the group's first non-``meta`` parameter.

    Ties break when a parameter is replaced by a new tensor (loading, hooks); this restores them.
    """
    for group in tied_params:
        owners = [_owner(model, name) for name in group]
        source = next(
            (getattr(module, leaf) for module, leaf in owners if getattr(module, leaf).device.type != "meta"),
            None,
        )
        if source is None:
            continue
        for module, leaf in owners:
            setattr(module, leaf, source)


def set_module_tensor_to_device(
    module: nn.Module,
    tensor_name: str,
    device: Device,
    value: torch.Tensor | None = None,
    dtype: DtypeLike | None = None,
    fp16_statistics: torch.Tensor | None = None,
    tied_params_map: MutableMapping[int, dict[Any, torch.Tensor]] | None = None,
    non_blocking: bool = False,
    clear_cache: bool = True,
) -> None:
    """Put the parameter or buffer ``tensor_name`` of ``module`` on ``device``, optionally with a new value.

    ``param.to(device)`` would make a tensor unknown to the module; this replaces the module's
    entry instead. Parameters stay parameters of the same class with the same ``requires_grad``.
    ``value`` is cast to ``dtype`` when given (integer and bool values keep theirs), else to the
    current tensor's dtype, as ``nn.Module.load_state_dict`` does. A ``meta`` tensor needs a
    ``value``. ``tied_params_map`` (data pointer -> device -> tensor) lets tied weights share one
    copy per device.

    When the current tensor holds real memory on ``device`` in the final dtype (and is a plain
    parameter or buffer), ``value`` is copied into it under ``no_grad``: the parameter object
    stays the same, so optimizers and ties built before keep working. Otherwise (a ``meta``
    tensor, a new device or dtype) the entry is replaced. Accelerate always replaces it.

    Raises:
        TypeError: ``value`` is not a tensor.
        ValueError: no such tensor, a ``meta`` tensor without ``value``, or a shape mismatch.
    """
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(
            f"set_module_tensor_to_device(value=...) takes a torch.Tensor, not {type(value).__name__} "
            f"({_short_repr(value)}); convert it first, e.g. value=torch.tensor(...)"
        )
    owner, leaf, is_buffer, old = _slot(module, tensor_name)
    if tied_params_map is not None:
        for pointer in (value.data_ptr() if value is not None else None, old.data_ptr()):
            shared = tied_params_map.get(pointer) if pointer is not None else None
            if shared is not None and device in shared:
                owner._parameters[leaf] = shared[device]  # type: ignore[assignment]
                return
    target = torch.device(device) if not isinstance(device, torch.device) else device
    if old.device.type == "meta" and target.type != "meta" and value is None:
        raise ValueError(
            f"tensor_name={tensor_name!r} is on the meta device: pass `value` to place it on {device!r}"
        )
    param_cls = type(old)
    if value is not None and old.shape != value.shape and param_cls.__name__ != "Params4bit":
        raise ValueError(
            f'Trying to set a tensor of shape {value.shape} in "{tensor_name}" (which has shape '
            f"{old.shape}), this looks incorrect. The value does not fit the model's tensor: the "
            "checkpoint (or value) does not match this model."
        )
    with torch.no_grad():
        if value is None:
            new = old.to(target, non_blocking=non_blocking)
            if dtype is not None and target.type == "meta" and not keeps_own_dtype(old.dtype):
                new = new.to(as_torch_dtype(dtype))
        else:
            final = old.dtype if dtype is None else value_dtype(value.dtype, as_torch_dtype(dtype))
            if fp16_statistics is None and copies_in_place(old, target, final):
                old.copy_(value, non_blocking=non_blocking)  # casts and moves in the same pass
                new = old
            else:
                new = value.to(final, non_blocking=non_blocking).to(target, non_blocking=non_blocking)
        if new is old:
            pass
        elif is_buffer:
            owner._buffers[leaf] = new
        elif value is not None or type(new) is not param_cls:
            owner._parameters[leaf] = _as_parameter(new, old, param_cls)
            if fp16_statistics is not None:
                owner._parameters[leaf].SCB = fp16_statistics.to(target, non_blocking=non_blocking)  # type: ignore[union-attr]
    if clear_cache and target.type not in ("cpu", "meta"):
        clear_device_cache()
    if tied_params_map is not None:
        placed = owner._buffers[leaf] if is_buffer else owner._parameters[leaf]
        for pointer in (old.data_ptr(), value.data_ptr() if value is not None else None):
            if pointer is not None and pointer in tied_params_map and device not in tied_params_map[pointer]:
                tied_params_map[pointer][device] = placed  # type: ignore[assignment]
                break


def copies_in_place(old: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a value for ``old`` that ends on ``device`` in ``dtype`` is copied into ``old`` (which
    keeps its identity) rather than replacing it: ``old`` must hold real memory there, in that
    dtype, and be a plain parameter or tensor (quantized parameter classes are rebuilt)."""
    return (
        old.device == device
        and old.device.type != "meta"
        and old.dtype == dtype
        and type(old) in (nn.Parameter, torch.Tensor)
    )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_parameter(new: torch.Tensor, old: torch.Tensor, param_cls: type) -> nn.Parameter:
    """``new`` wrapped as ``old``'s parameter class, keeping ``requires_grad`` and extra attributes."""
    extra = dict(getattr(old, "__dict__", {}))
    hf_initialized = extra.pop("_is_hf_initialized", None)
    data = new.data if isinstance(new, nn.Parameter) else new
    if issubclass(param_cls, nn.Parameter) and param_cls is not nn.Parameter:
        wrapped = param_cls(data, requires_grad=old.requires_grad, **extra)
    else:
        wrapped = nn.Parameter(data, requires_grad=old.requires_grad)
    if hf_initialized is not None:
        wrapped._is_hf_initialized = hf_initialized  # type: ignore[attr-defined]
    return wrapped
