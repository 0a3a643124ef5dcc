"""Reading the weights of a model whose parameters are offloaded by hooks (kept on ``meta`` and loaded
from CPU or disk only for each ``forward``).

The offloading hook is ``hasten.hooks.AlignDevicesHook`` (one layer up); this module talks to it
through what every such hook has: ``offload``, ``execution_device``, ``pre_forward`` and
``post_forward``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from hasten.utils.modeling import set_module_tensor_to_device
from hasten.utils.typing import Device


def has_offloaded_params(module: nn.Module) -> bool:
    """Whether ``module`` carries an offloading hook (``AlignDevicesHook(offload=True)``) of its own."""
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False)) and hasattr(hook, "pre_forward")


@contextlib.contextmanager
def align_module_device(module: nn.Module, execution_device: Device | None = None) -> Iterator[None]:
    """Within the block, ``module``'s own parameters are real tensors on one device.

    An offloaded module is loaded as for a ``forward`` (on ``execution_device`` when given, else on
    its hook's execution device) and offloaded again afterwards. Otherwise, with
    ``execution_device``, its direct parameters move there and back; without, nothing happens.
    """
    if has_offloaded_params(module):
        hook: Any = module._hf_hook
        original = hook.execution_device
        if execution_device is not None:
            hook.execution_device = execution_device
        try:
            hook.pre_forward(module)
            yield
        finally:
            hook.post_forward(module, None)
            hook.execution_device = original
    elif execution_device is not None:
        originals = dict(module.named_parameters(recurse=False))
        try:
            for name in originals:
                set_module_tensor_to_device(module, name, execution_device)
            yield
        finally:  # the original parameters come back (optimizers hold them), with any change made inside
            for name, original in originals.items():
                moved = module._parameters[name]
                if moved is not original and moved is not None and moved.device.type != "meta":
                    with torch.no_grad():
                        original.copy_(moved)
                module._parameters[name] = original
    else:
        yield


def get_state_dict_offloaded_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a model with offloaded parts, on the CPU, one module loaded at a time.

    Tensors that are still on ``meta`` after loading (placeholders no checkpoint filled) are left
    out, with a warning naming them. The model's own tensors (outside any submodule) are included;
    Accelerate leaves them out.

    Raises:
        MemoryError: one module's weights do not fit in CPU memory.
    """
    found: dict[str, torch.Tensor] = {}
    placeholders: set[str] = set()
    for name, module in model.named_modules():  # a hook may load a whole subtree: every level is read
        try:
            with align_module_device(module, "cpu"):
                module_state = module.state_dict()
                for key, tensor in module_state.items():
                    full_name = f"{name}.{key}" if name else key
                    if tensor.device.type == "meta":
                        placeholders.add(full_name)
                    elif full_name not in found:
                        found[full_name] = tensor.to("cpu", copy=True)
        except MemoryError:
            raise MemoryError(
                f"Offloaded module must fit in CPU memory to call save_model! {name or 'the model'!r} "
                f"({type(module).__name__}) does not: free CPU memory, or save module by module."
            ) from None
    missing = sorted(placeholders - set(found))
    if missing:
        warnings.warn(
            f"The following tensors were not saved because they were still on meta device: {missing}",
            UserWarning,
            stacklevel=2,
        )
    order = list(model.state_dict())
    return {name: found[name] for name in order if name in found}


def get_state_dict_from_offload(
    module: nn.Module,
    module_name: str,
    state_dict: MutableMapping[str, Any],
    device_to_put_offload: Device = "cpu",
) -> MutableMapping[str, Any]:
    """Fill the entries of ``state_dict`` that belong to ``module`` (named by the tensor name
    ``module_name``, e.g. ``"layer.weight"``) with its real weights, loaded on ``device_to_put_offload``
    when ``module`` is offloaded. Returns ``state_dict``."""
    root = module_name.rpartition(".")[0]
    device = device_to_put_offload if has_offloaded_params(module) else None
    with align_module_device(module, device):
        for key, tensor in module.state_dict().items():
            full_name = f"{root}.{key}" if root else key
            if full_name in state_dict:
                state_dict[full_name] = tensor
    return state_dict
