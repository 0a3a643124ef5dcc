"""Big-model inference: run models whose weights do not fit on the compute device.

:func:`dispatch_model` places each block of a device map on its device and hooks
the model so inputs follow; blocks mapped to ``"cpu"`` or ``"disk"`` stay off
the compute device and are loaded for the duration of their ``forward`` only.
:func:`load_checkpoint_and_dispatch` does the whole job from a checkpoint:
plan the map under a memory budget, stream the weights into place, dispatch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn

from hasten.hooks import (
    AlignDevicesHook,
    CpuOffload,
    UserCpuOffloadHook,
    add_hook_to_module,
    attach_align_device_hook,
    attach_align_device_hook_on_blocks,
)
from hasten.layerwise_casting import attach_layerwise_casting_hooks  # noqa: F401  (Accelerate's path)
from hasten.utils.device import accelerator_type, device_for_local_process
from hasten.utils.device_map import check_device_map, infer_auto_device_map
from hasten.utils.environment import parse_flag_from_env
from hasten.utils.loading import load_checkpoint_in_model
from hasten.utils.memory_budget import get_balanced_memory
from hasten.utils.modeling import find_tied_parameters, retie_parameters
from hasten.utils.offload import OffloadedWeightsLoader, extract_submodules_state_dict, offload_state_dict
from hasten.utils.typing import Device, PathLike

logger = logging.getLogger(__name__)

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _include_buffers(include_buffers: bool | None) -> bool:
    if include_buffers is None:
        return parse_flag_from_env("ACCELERATE_INIT_INCLUDE_BUFFERS", False)
    return include_buffers


@contextlib.contextmanager
def init_on_device(device: Device, include_buffers: bool | None = None) -> Iterator[None]:
    """Create the parameters of every module built in this block on ``device`` (and its buffers too
    when ``include_buffers``; by default they stay on the CPU with their values, since models
    compute some of them, like rotary frequencies, at construction).

    With buffers included this is ``torch.device(device)`` as a context: a scoped
    ``TorchFunctionMode``, so tensors are created there directly and nothing is allocated on
    ``meta``. Otherwise a module parameter-registration hook (torch's public API, removed on
    exit) moves each parameter as it is registered, before the module initialises it. Like
    Accelerate's, that hook sees modules built by other threads during the block.
    ``include_buffers=None`` reads ``ACCELERATE_INIT_INCLUDE_BUFFERS``.
    """
    target = (
        torch.device(device) if isinstance(device, (str, torch.device)) else torch.device(_as_device(device))
    )
    if _include_buffers(include_buffers):
        with target:
            yield
        return

    def place(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.device == target:
            return None
        extra = {key: value for key, value in vars(param).items() if key != "_is_hf_initialized"}
        moved = param.to(target)
        if type(param) is nn.Parameter:
            return nn.Parameter(moved, requires_grad=param.requires_grad)
        return type(param)(moved, requires_grad=param.requires_grad, **extra)

    handle = nn.modules.module.register_module_parameter_registration_hook(cast(Callable[..., None], place))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool | None = None) -> Iterator[None]:
    """Build models on the ``meta`` device: shapes and dtypes without memory, to plan and load big models.

    ``init_on_device("meta", include_buffers)``; load real weights afterwards with
    :func:`load_checkpoint_and_dispatch` or :func:`~hasten.utils.load_checkpoint_in_model`.
    """
    with init_on_device(torch.device("meta"), include_buffers=include_buffers):
        yield


def _execution_device(execution_device: Device | None) -> Device:
    return execution_device if execution_device is not None else device_for_local_process(0)


def cpu_offload(
    model: nn.Module,
    execution_device: Device | None = None,
    offload_buffers: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    preload_module_classes: list[str] | None = None,
) -> nn.Module:
    """Keep every weight on the CPU and copy each module's weights to ``execution_device`` only while it runs.

    Uses the least accelerator memory of all strategies, at the cost of one host-to-device copy
    of the whole model per forward pass. Outputs come back on the device the inputs came from.

    Args:
        model: the model to offload (changed in place and returned).
        execution_device: where the computation runs; the first accelerator (or the CPU) by default.
        offload_buffers: offload buffers too, instead of keeping them on the execution device.
        state_dict: the CPU weights to load from; a CPU copy of ``model.state_dict()`` by default.
        preload_module_classes: module classes whose whole subtree is loaded at once.
    """
    execution_device = _execution_device(execution_device)
    if state_dict is None:
        state_dict = {name: tensor.to("cpu") for name, tensor in model.state_dict().items()}
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True), append=True)
    attach_align_device_hook(
        model,
        execution_device=execution_device,
        offload=True,
        offload_buffers=offload_buffers,
        weights_map=state_dict,
        preload_module_classes=preload_module_classes,
    )
    return model


def cpu_offload_with_hook(
    model: nn.Module,
    execution_device: Device | None = None,
    prev_module_hook: UserCpuOffloadHook | None = None,
) -> tuple[nn.Module, UserCpuOffloadHook]:
    """Keep a whole model on the CPU, moving it to ``execution_device`` when called; return a handle.

    Cheaper than :func:`cpu_offload` for pipelines that call a model many times in a row: it
    stays on the device until ``handle.offload()`` (or the next model's hook, when passed as
    ``prev_module_hook``) sends it back.
    """
    hook = CpuOffload(execution_device=execution_device, prev_module_hook=prev_module_hook)
    add_hook_to_module(model, hook, append=True)
    return model, UserCpuOffloadHook(model, hook)


def disk_offload(
    model: nn.Module,
    offload_dir: PathLike,
    execution_device: Device | None = None,
    offload_buffers: bool = False,
    preload_module_classes: list[str] | None = None,
) -> nn.Module:
    """Keep every weight in memory-mapped files under ``offload_dir``, loading each module's weights while it
    runs.

    The weights are written there first unless ``offload_dir`` already holds an offload
    ``index.json`` (from a previous call or from ``offload_state_dict``).
    """
    if not os.path.isfile(os.path.join(offload_dir, "index.json")):
        offload_state_dict(offload_dir, model.state_dict())
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True), append=True)
    attach_align_device_hook(
        model,
        execution_device=_execution_device(execution_device),
        offload=True,
        offload_buffers=offload_buffers,
        weights_map=OffloadedWeightsLoader(save_folder=offload_dir),
        preload_module_classes=preload_module_classes,
    )
    return model


def _as_device(device: Device) -> Device:
    """A device-map value in a form ``Tensor.to`` accepts (integers index the present accelerator)."""
    if isinstance(device, int):
        kind = accelerator_type()
        return torch.device("cuda" if kind == "cpu" else kind, device)
    return device


def _refuse_moves(method: Callable[..., Any], model: nn.Module) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        target = torch._C._nn._parse_to(*args, **kwargs)[0] if method.__name__ == "to" else "the accelerator"
        if target is None:  # a dtype-only `.to(torch.float16)` moves nothing
            return method(*args, **kwargs)
        raise RuntimeError(
            f"This model was dispatched with device_map={getattr(model, 'hf_device_map', {})!r}: its "
            "modules run on "
            "their own devices (some weights may live on the CPU or disk and are loaded on demand). Moving "
            "it with "
            f".{method.__name__}() to {target} would break that placement. To move it, first remove the "
            "hooks with "
            "`hasten.hooks.remove_hook_from_submodules(model)` (offloaded weights must then be loaded "
            "back), or "
            "dispatch again with the device map you want."
        )

    return guarded


def _offload_folder_needed(
    device_map: Mapping[str, Device], offload_dir: PathLike | None, offload_index: Any
) -> list[str]:
    disk_modules = [name for name, device in device_map.items() if device == "disk"]
    if disk_modules and offload_dir is None and offload_index is None:
        raise ValueError(
            f"device_map sends {disk_modules} to 'disk', so dispatch_model needs offload_dir=<folder> to "
            "keep their "
            "weights in (or offload_index= describing weights already offloaded)."
        )
    return disk_modules


def dispatch_model(
    model: nn.Module,
    device_map: dict[str, Device],
    main_device: torch.device | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    offload_dir: PathLike | None = None,
    offload_index: dict[str, str] | None = None,
    offload_buffers: bool = False,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    force_hooks: bool = False,
) -> nn.Module:
    """Place the blocks of ``model`` as ``device_map`` says and hook it so that it runs across them.

    Blocks mapped to ``"cpu"`` (when computing on an accelerator) or ``"disk"`` are offloaded:
    their weights stay there and are loaded onto ``main_device`` for their ``forward`` only.
    A map with a single device and no disk simply moves the model (unless ``force_hooks``).
    The map is kept as ``model.hf_device_map``; moving the model afterwards is refused.

    Raises:
        ValueError: the map misses some of the model's parameters or names unknown modules, or
            sends blocks to disk without ``offload_dir``.
    """
    check_device_map(model, device_map)
    devices = set(device_map.values())
    if len(devices) == 1 and "disk" not in devices and not force_hooks:
        model.to(_as_device(next(iter(devices))))
        setattr(model, "hf_device_map", dict(device_map))  # noqa: B010 - torch types attributes as Tensor | Module
        return model
    if main_device is None:
        on_accelerators = [device for device in device_map.values() if device not in ("cpu", "disk")]
        main_device = on_accelerators[0] if on_accelerators else "cpu"  # type: ignore[assignment]
    main_is_cpu = str(main_device) in ("cpu", "mps")
    cpu_modules = [name for name, device in device_map.items() if device == "cpu"]
    if not main_is_cpu and state_dict is None and cpu_modules:
        state_dict = extract_submodules_state_dict(model.state_dict(), cpu_modules)
    disk_modules = _offload_folder_needed(device_map, offload_dir, offload_index)
    if (
        disk_modules
        and offload_index is None
        and not os.path.isfile(os.path.join(offload_dir or "", "index.json"))
    ):
        offload_state_dict(offload_dir, extract_submodules_state_dict(model.state_dict(), disk_modules))  # type: ignore[arg-type]
    offloaded = {"disk"} if main_is_cpu else {"cpu", "disk"}
    execution_device = {
        name: main_device if device in ("cpu", "disk") else device for name, device in device_map.items()
    }
    execution_device[""] = main_device
    weights_map = None
    save_folder = offload_dir if disk_modules else None
    if state_dict is not None or save_folder is not None or offload_index is not None:
        weights_map = OffloadedWeightsLoader(
            state_dict=state_dict,
            save_folder=save_folder,
            index=offload_index,
            device=main_device if offload_index is not None else None,
        )
    tied_params = find_tied_parameters(model)
    tied_params_map: dict[int, dict[torch.device, torch.Tensor]] = {}
    for group in tied_params:
        for name in group:
            tensor = model.get_parameter(name)
            if tensor.device.type != "meta":
                tied_params_map[tensor.data_ptr()] = {}
    attach_align_device_hook_on_blocks(
        model,
        execution_device={
            name: _as_device(cast(Device, device)) for name, device in execution_device.items()
        },
        offload={name: device in offloaded for name, device in device_map.items()},
        offload_buffers=offload_buffers,
        weights_map=weights_map,
        skip_keys=skip_keys,
        preload_module_classes=preload_module_classes,
        tied_params_map=tied_params_map,
    )
    retie_parameters(model, tied_params)  # attaching hooks may have broken ties
    setattr(model, "hf_device_map", dict(device_map))  # noqa: B010
    model.to = _refuse_moves(model.to, model)  # type: ignore[method-assign]
    kind = accelerator_type()
    mover = "cuda" if kind in ("cpu", "mps") else kind
    if hasattr(model, mover):
        setattr(model, mover, _refuse_moves(getattr(model, mover), model))
    return model


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: PathLike,
    device_map: str | dict[str, Device] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    no_split_module_classes: list[str] | None = None,
    offload_folder: PathLike | None = None,
    offload_buffers: bool = False,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool | None = None,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    force_hooks: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
) -> nn.Module:
    """Load a checkpoint into ``model`` (typically built under ``init_empty_weights``) and dispatch it.

    Args:
        device_map: a dict, or one of ``"auto"``/``"balanced"`` (spread evenly over the accelerators),
            ``"balanced_low_0"`` (leave room on the first one, e.g. for generation), ``"sequential"``
            (fill each device in turn); ``None`` loads without dispatching.
        max_memory: budget per device (``{0: "10GiB", "cpu": "30GiB"}``); what does not fit goes to disk.
        offload_state_dict: stage CPU-bound weights on disk while loading, to bound RAM; on by
            default when the map uses the disk.

    Raises:
        ValueError: ``device_map`` is a string other than the four strategies.
    """
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"device_map={device_map!r} is not a strategy; use one of {list(DEVICE_MAP_STRATEGIES)} or "
                "a dict."
            )
        if device_map != "sequential":
            max_memory = get_balanced_memory(  # type: ignore[assignment]
                model,
                max_memory=max_memory,
                no_split_module_classes=no_split_module_classes,
                dtype=dtype,
                low_zero=(device_map == "balanced_low_0"),
            )
        device_map = infer_auto_device_map(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split_module_classes,
            dtype=dtype,
            offload_buffers=offload_buffers,
        )
    if offload_state_dict is None and device_map is not None:
        offload_state_dict = "disk" in device_map.values()
    load_checkpoint_in_model(
        model,
        checkpoint,
        device_map=device_map,
        offload_folder=offload_folder,
        dtype=dtype,
        offload_state_dict=bool(offload_state_dict),
        offload_buffers=offload_buffers,
        strict=strict,
        full_state_dict=full_state_dict,
        broadcast_from_rank0=broadcast_from_rank0,
    )
    if device_map is None:
        return model
    return dispatch_model(
        model,
        device_map=device_map,
        offload_dir=offload_folder,
        offload_buffers=offload_buffers,
        skip_keys=skip_keys,
        preload_module_classes=preload_module_classes,
        force_hooks=force_hooks,
    )
