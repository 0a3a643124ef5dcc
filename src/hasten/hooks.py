"""Hooks around a module's ``forward``: move inputs and weights to where the computation runs.

A :class:`ModelHook` sees a module's inputs before ``forward`` and its output
after. :func:`add_hook_to_module` installs one by wrapping ``forward`` (the
original is kept as ``module._old_forward``, the hook as ``module._hf_hook`` —
the attribute names other libraries look for); :func:`remove_hook_from_module`
undoes it exactly, so a module whose ``forward`` came from its class gets the
class method back rather than a copy pinned on the instance.

:class:`AlignDevicesHook` is what big-model inference is built on: it puts a
module's weights on its execution device (or, with ``offload``, keeps them on
``meta`` and loads them from a weights map only for the duration of
``forward``) and moves the inputs there too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from hasten.utils.batches import find_device, send_to_device
from hasten.utils.device import device_for_local_process
from hasten.utils.modeling import named_module_tensors, set_module_tensor_to_device
from hasten.utils.offload import PrefixedDataset
from hasten.utils.reexport import lazy_reexports
from hasten.utils.typing import Device

# Attributes dispatch_model sets on a model to refuse moves; removing hooks removes them too.
DISPATCH_GUARDS = ("to", "cuda", "xpu", "npu", "mlu", "musa", "sdaa")

TiedParamsMap = MutableMapping[int, dict[torch.device, torch.Tensor]]
"""Per storage pointer of a tied weight, the copy already on each device (shared instead of copied twice)."""


class ModelHook:
    """Something to run before and after a module's ``forward``; subclass and override what you need.

    Attributes:
        no_grad: run the wrapped ``forward`` under ``torch.no_grad()``.
    """

    no_grad = False

    def init_hook(self, module: nn.Module) -> nn.Module:
        """Called once when the hook is attached; returns the (possibly changed) module."""
        return module

    def pre_forward(
        self, module: nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Called before ``forward`` with its inputs; returns the inputs to use."""
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        """Called after ``forward`` with its output; returns the output to use."""
        return output

    def detach_hook(self, module: nn.Module) -> nn.Module:
        """Called when the hook is removed; undoes what ``init_hook`` did."""
        return module


class SequentialHook(ModelHook):
    """Several hooks run one after the other, in the order given (for inputs and outputs alike)."""

    def __init__(self, *hooks: ModelHook) -> None:
        self.hooks = hooks

    def init_hook(self, module: nn.Module) -> nn.Module:
        for hook in self.hooks:
            module = hook.init_hook(module)
        return module

    def pre_forward(
        self, module: nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for hook in self.hooks:
            args, kwargs = hook.pre_forward(module, *args, **kwargs)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        for hook in self.hooks:
            output = hook.post_forward(module, output)
        return output

    def detach_hook(self, module: nn.Module) -> nn.Module:
        for hook in self.hooks:
            module = hook.detach_hook(module)
        return module


def _hooked_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    hook: ModelHook = getattr(module, "_hf_hook")  # noqa: B009 - torch types module attributes as Tensor | Module
    args, kwargs = hook.pre_forward(module, *args, **kwargs)
    if hook.no_grad:
        with torch.no_grad():
            output = getattr(module, "_old_forward")(*args, **kwargs)  # noqa: B009
    else:
        output = getattr(module, "_old_forward")(*args, **kwargs)  # noqa: B009
    return hook.post_forward(module, output)


def add_hook_to_module(module: nn.Module, hook: ModelHook, append: bool = False) -> nn.Module:
    """Run ``hook`` around every call of ``module``'s ``forward``; returns the module (changed in place).

    A hook already there is replaced (its ``detach_hook`` runs first), unless ``append``
    chains the new one after it in a :class:`SequentialHook`.
    """
    old_hook = getattr(module, "_hf_hook", None)
    if old_hook is not None:
        remove_hook_from_module(module)
        if append:
            hook = SequentialHook(old_hook, hook)
    original = module.forward
    module = hook.init_hook(module)
    setattr(module, "_old_forward", original)  # noqa: B010 - see _hooked_forward
    setattr(module, "_hf_hook", hook)  # noqa: B010
    # update_wrapper keeps the signature visible (inspect follows __wrapped__), as callers such as
    # generation utilities inspect forward's parameters.
    module.forward = functools.update_wrapper(functools.partial(_hooked_forward, module), original)
    return module


def _restore_forward(module: nn.Module) -> None:
    original = module.__dict__.pop("_old_forward")
    from_class = getattr(original, "__self__", None) is module and getattr(
        original, "__func__", None
    ) is getattr(type(module), "forward", None)
    if from_class:
        module.__dict__.pop("forward", None)  # the class's forward is found again, exactly as before
    else:
        module.forward = original


def remove_hook_from_module(module: nn.Module, recurse: bool = False) -> nn.Module:
    """Detach the hook of ``module`` (and of all its submodules with ``recurse``), restoring ``forward``."""
    hook = module.__dict__.pop("_hf_hook", None)
    if hook is not None:
        hook.detach_hook(module)
    if "_old_forward" in module.__dict__:
        _restore_forward(module)
    for name in DISPATCH_GUARDS:
        module.__dict__.pop(name, None)
    if recurse:
        for child in module.children():
            remove_hook_from_module(child, recurse=True)
    return module


def remove_hook_from_submodules(module: nn.Module) -> None:
    """Remove the hooks of ``module`` and of every module below it."""
    remove_hook_from_module(module, recurse=True)


def _non_persistent_buffers(module: nn.Module, recurse: bool) -> list[str]:
    modules = module.named_modules() if recurse else [("", module)]
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, owner in modules
        for name in owner._non_persistent_buffers_set
    ]


class AlignDevicesHook(ModelHook):
    """Keep a module's weights and inputs on one execution device, optionally offloading the weights.

    Args:
        execution_device: where ``forward`` runs; inputs (and weights) are moved there.
        offload: keep the weights on ``meta`` between calls, loading them from ``weights_map``
            for the duration of ``forward`` only.
        io_same_device: move the output back to the device the inputs came from.
        weights_map: name -> tensor (often lazy: a disk-backed loader) to load offloaded weights from;
            defaults to CPU copies of the module's weights, taken when the hook is attached.
        offload_buffers: offload persistent buffers too (non-persistent ones always stay on device).
        place_submodules: treat the submodules' tensors as the module's own.
        skip_keys: keyword inputs left where they are (e.g. a cache that must not move).
        tied_params_map: shared between the hooks of a model so that a tied weight is loaded on a
            device once, not once per module using it.
    """

    def __init__(
        self,
        execution_device: Device | None = None,
        offload: bool = False,
        io_same_device: bool = False,
        weights_map: Mapping[str, torch.Tensor] | None = None,
        offload_buffers: bool = False,
        place_submodules: bool = False,
        skip_keys: str | list[str] | None = None,
        tied_params_map: TiedParamsMap | None = None,
    ) -> None:
        self.execution_device = execution_device
        self.offload = offload
        self.io_same_device = io_same_device
        self.weights_map = weights_map
        self.offload_buffers = offload_buffers
        self.place_submodules = place_submodules
        self.skip_keys = skip_keys
        self.tied_params_map = tied_params_map
        self.input_device: torch.device | None = None
        self.original_devices: dict[str, torch.device] = {}
        self._loaded_tied: set[tuple[int, Any]] = set()

    def __repr__(self) -> str:
        return (
            f"AlignDevicesHook(execution_device={self.execution_device}, offload={self.offload}, "
            f"io_same_device={self.io_same_device}, offload_buffers={self.offload_buffers}, "
            f"place_submodules={self.place_submodules}, skip_keys={self.skip_keys!r})"
        )

    def _offloaded(self, module: nn.Module) -> list[str]:
        return [
            name
            for name, _ in named_module_tensors(
                module,
                include_buffers=self.offload_buffers,
                recurse=self.place_submodules,
                remove_non_persistent=True,
            )
        ]

    def init_hook(self, module: nn.Module) -> nn.Module:
        if self.execution_device is not None and torch.device(self.execution_device).type == "meta":
            self.tied_params_map = None  # every meta tensor has data_ptr 0: nothing to share
        tensors = dict(named_module_tensors(module, recurse=self.place_submodules))
        if not self.offload:
            if self.execution_device is not None:
                for name in tensors:
                    set_module_tensor_to_device(
                        module, name, self.execution_device, tied_params_map=self.tied_params_map
                    )
            return module
        self.original_devices = {name: tensor.device for name, tensor in tensors.items()}
        if self.weights_map is None:
            self.weights_map = {name: tensors[name].to("cpu") for name in self._offloaded(module)}
        for name in self._offloaded(module):
            set_module_tensor_to_device(module, name, "meta")
        if self.execution_device is not None:
            stay = (
                _non_persistent_buffers(module, self.place_submodules)
                if self.offload_buffers
                else [name for name, _ in module.named_buffers(recurse=self.place_submodules)]
            )
            for name in stay:
                set_module_tensor_to_device(
                    module, name, self.execution_device, tied_params_map=self.tied_params_map
                )
        return module

    def _load_weights(self, module: nn.Module) -> None:
        assert self.weights_map is not None
        for name in self._offloaded(module):
            value = self.weights_map[name]
            statistics = None
            if value.dtype == torch.int8 and "weight" in name:  # 8-bit weights keep their scales beside them
                statistics = self.weights_map.get(name.replace("weight", "SCB"))
            if self.tied_params_map is not None and value.data_ptr() in self.tied_params_map:
                placed = self.tied_params_map[value.data_ptr()]
                if self.execution_device not in placed:
                    self._loaded_tied.add((value.data_ptr(), self.execution_device))
            set_module_tensor_to_device(
                module,
                name,
                self.execution_device if self.execution_device is not None else "cpu",
                value=value,
                fp16_statistics=statistics,
                tied_params_map=self.tied_params_map,
            )

    def pre_forward(
        self, module: nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.io_same_device:
            self.input_device = find_device([args, kwargs])
        if self.offload:
            self._load_weights(module)
        if self.execution_device is None:
            return args, kwargs
        return (
            send_to_device(args, self.execution_device),
            send_to_device(kwargs, self.execution_device, skip_keys=self.skip_keys),
        )

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.offload:
            for name in self._offloaded(module):
                set_module_tensor_to_device(module, name, "meta")
            if self.tied_params_map is not None:
                for pointer, device in self._loaded_tied:
                    self.tied_params_map.get(pointer, {}).pop(device, None)
            self._loaded_tied.clear()
        if self.io_same_device and self.input_device is not None:
            output = send_to_device(output, self.input_device, skip_keys=self.skip_keys)
        return output

    def detach_hook(self, module: nn.Module) -> nn.Module:
        if self.offload and self.weights_map is not None:
            for name, device in self.original_devices.items():
                if device.type != "meta" and name in self.weights_map:
                    set_module_tensor_to_device(module, name, device, value=self.weights_map[name])
        return module


def attach_execution_device_hook(
    module: nn.Module,
    execution_device: Device,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    tied_params_map: TiedParamsMap | None = None,
) -> None:
    """Give every module holding tensors of its own an :class:`AlignDevicesHook` to ``execution_device``.

    Modules of a class in ``preload_module_classes`` get one hook for their whole subtree.
    """
    if not hasattr(module, "_hf_hook") and len(module.state_dict()) > 0:
        add_hook_to_module(
            module, AlignDevicesHook(execution_device, skip_keys=skip_keys, tied_params_map=tied_params_map)
        )
    if preload_module_classes is not None and type(module).__name__ in preload_module_classes:
        return
    for child in module.children():
        attach_execution_device_hook(
            child, execution_device, skip_keys, preload_module_classes, tied_params_map
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def attach_align_device_hook(
    module: nn.Module,
    execution_device: Device | None = None,
    offload: bool = False,
    weights_map: Mapping[str, torch.Tensor] | None = None,
    offload_buffers: bool = False,
    module_name: str = "",
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    tied_params_map: TiedParamsMap | None = None,
) -> None:
    """Give every module with parameters of its own an :class:`AlignDevicesHook` (with ``offload``, one that
    loads its weights from ``weights_map`` under the module's own name prefix, ``module_name``)."""
    own: list[tuple[str, torch.Tensor]] = list(module.named_parameters(recurse=False))
    preload = preload_module_classes is not None and type(module).__name__ in preload_module_classes
    if offload_buffers:
        own += list(module.named_buffers(recurse=False))
    if own or preload:
        prefixed = (
            PrefixedDataset(weights_map, f"{module_name}.")
            if weights_map is not None and module_name
            else weights_map
        )
        hook = AlignDevicesHook(
            execution_device=execution_device,
            offload=offload,
            weights_map=prefixed,
            offload_buffers=offload_buffers,
            place_submodules=preload,
            skip_keys=skip_keys,
            tied_params_map=tied_params_map,
        )
        add_hook_to_module(module, hook, append=True)
    if preload:
        return
    for name, child in module.named_children():
        attach_align_device_hook(
            child,
            execution_device,
            offload,
            weights_map,
            offload_buffers,
            _join(module_name, name),
            skip_keys,
            preload_module_classes,
            tied_params_map,
        )


def attach_align_device_hook_on_blocks(
    module: nn.Module,
    execution_device: Device | Mapping[str, Device] | None = None,
    offload: bool | Mapping[str, bool] = False,
    weights_map: Mapping[str, torch.Tensor] | None = None,
    offload_buffers: bool = False,
    module_name: str = "",
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    tied_params_map: TiedParamsMap | None = None,
) -> None:
    """Hook the blocks of a device map: each named block runs on its device, offloaded or not.

    ``execution_device`` and ``offload`` are one value for the whole module, or dicts from block
    name (as in a device map; ``""`` is the root) to the block's value (a single value given with
    a dict applies to every block). A block kept on its device gets one hook that places its
    whole subtree there; an offloaded block gets per-module offload hooks. The root always gets a
    hook that returns outputs to the device the inputs came from.
    """
    if not isinstance(execution_device, Mapping) and not isinstance(offload, Mapping):
        if offload:
            attach_align_device_hook(
                module,
                execution_device,
                True,
                weights_map,
                offload_buffers,
                module_name,
                skip_keys,
                tied_params_map=tied_params_map,
            )
        else:
            hook = AlignDevicesHook(
                execution_device=execution_device,
                io_same_device=True,
                skip_keys=skip_keys,
                place_submodules=True,
                tied_params_map=tied_params_map,
            )
            add_hook_to_module(module, hook)
        return
    devices = (
        dict(execution_device)
        if isinstance(execution_device, Mapping)
        else dict.fromkeys(offload, execution_device)  # type: ignore[arg-type]
    )
    offloads = dict(offload) if isinstance(offload, Mapping) else dict.fromkeys(devices, offload)
    _hook_block(
        module,
        devices,
        offloads,
        weights_map,
        offload_buffers,
        module_name,
        skip_keys,
        preload_module_classes,
        tied_params_map,
    )


def _hook_block(
    module: nn.Module,
    devices: dict[str, Any],
    offloads: dict[str, bool],
    weights_map: Mapping[str, torch.Tensor] | None,
    offload_buffers: bool,
    name: str,
    skip_keys: str | list[str] | None,
    preload_module_classes: list[str] | None,
    tied_params_map: TiedParamsMap | None,
) -> None:
    is_root = name == ""
    if name in devices and name in offloads:
        device = devices[name]
        if offloads[name]:
            attach_align_device_hook(
                module,
                device,
                True,
                weights_map,
                offload_buffers,
                name,
                skip_keys,
                preload_module_classes,
                tied_params_map,
            )
            if not hasattr(module, "_hf_hook"):
                hook = AlignDevicesHook(
                    device, io_same_device=is_root, skip_keys=skip_keys, tied_params_map=tied_params_map
                )
                add_hook_to_module(module, hook)
            attach_execution_device_hook(module, device, skip_keys, preload_module_classes, tied_params_map)
        else:
            hook = AlignDevicesHook(
                device,
                offload_buffers=offload_buffers,
                io_same_device=is_root,
                place_submodules=True,
                skip_keys=skip_keys,
                tied_params_map=tied_params_map,
            )
            add_hook_to_module(module, hook)
            attach_execution_device_hook(module, device, skip_keys, tied_params_map=tied_params_map)
    elif is_root:
        add_hook_to_module(
            module,
            AlignDevicesHook(
                devices.get(""), io_same_device=True, skip_keys=skip_keys, tied_params_map=tied_params_map
            ),
        )
    for child_name, child in module.named_children():
        _hook_block(
            child,
            devices,
            offloads,
            weights_map,
            offload_buffers,
            _join(name, child_name),
            skip_keys,
            preload_module_classes,
            tied_params_map,
        )


class CpuOffload(ModelHook):
    """Keep a whole model on the CPU and move it to ``execution_device`` only when it is called.

    With ``prev_module_hook`` (a :class:`UserCpuOffloadHook`), the previous model of a pipeline is sent
    back to the CPU first, so only one model occupies the accelerator at a time.
    """

    def __init__(
        self, execution_device: Device | None = None, prev_module_hook: UserCpuOffloadHook | None = None
    ) -> None:
        self.prev_module_hook = prev_module_hook
        self.execution_device = (
            execution_device if execution_device is not None else _default_execution_device()
        )

    def init_hook(self, module: nn.Module) -> nn.Module:
        return module.to("cpu")

    def pre_forward(
        self, module: nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.prev_module_hook is not None:
            self.prev_module_hook.offload()
        module.to(self.execution_device)
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)


class UserCpuOffloadHook:
    """The handle :func:`cpu_offload_with_hook` returns: ``offload()`` sends the model back to the CPU,
    ``remove()`` takes the hook away."""

    def __init__(self, model: nn.Module, hook: ModelHook) -> None:
        self.model = model
        self.hook = hook

    def offload(self) -> None:
        """Move the model back to the CPU (until its next call)."""
        self.hook.init_hook(self.model)

    def remove(self) -> None:
        """Remove the offloading hook from the model."""
        remove_hook_from_module(self.model)


def _default_execution_device() -> torch.device:
    return device_for_local_process(0)


# Accelerate keeps this hook in `accelerate.hooks`; hasten keeps it with layerwise casting, which imports
# this module, so the name is resolved on first access.
__getattr__, __dir__ = lazy_reexports(
    __name__, globals(), {"hasten.layerwise_casting": "LayerwiseCastingHook"}
)
