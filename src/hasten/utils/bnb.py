"""Quantized loading with bitsandbytes: ``nn.Linear`` layers become 8-bit or 4-bit layers.

bitsandbytes is optional (``pip install 'hasten[test]'`` brings it); every function here
raises an ``ImportError`` naming it when it is missing. Weights are quantized when they are
put on their device, so a model built on ``meta`` is quantized layer by layer as the
checkpoint streams in, never holding the whole model in full precision.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hasten.big_modeling import dispatch_model, init_empty_weights
from hasten.utils.attributes import recursive_getattr
from hasten.utils.dataclasses.configs import BnbQuantizationConfig
from hasten.utils.device_map import infer_auto_device_map
from hasten.utils.imports import require
from hasten.utils.loading import load_checkpoint_in_model
from hasten.utils.memory_budget import get_balanced_memory
from hasten.utils.modeling import DtypeLike, find_tied_parameters, set_module_tensor_to_device
from hasten.utils.typing import Device, PathLike

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _bnb() -> Any:
    require("bitsandbytes", extra="test", purpose="quantize models to 8 or 4 bits")
    import bitsandbytes

    return bitsandbytes


def has_4bit_bnb_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds a bitsandbytes 4-bit linear layer."""
    bnb = _bnb()
    return any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


def get_keys_to_not_convert(model: nn.Module) -> list[str]:
    """Modules that should stay unquantized: those holding tied weights and the model's last child
    (usually the output head, whose precision matters most), as module names."""
    tied = sorted({name for group in find_tied_parameters(model) for name in group})
    children = [name for name, _ in model.named_children()]
    base_model_prefix = getattr(model, "base_model_prefix", None)
    is_base_model = base_model_prefix is not None and not hasattr(model, base_model_prefix)
    if not tied and is_base_model:
        return []
    keep = list(dict.fromkeys(name.removesuffix(".weight").removesuffix(".bias") for name in tied))
    return keep + [name for name in children[-1:] if name not in keep]


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == key or name.startswith(key + ".") or name.endswith("." + key) for key in skip)


def _quantized_linear(linear: nn.Linear, config: BnbQuantizationConfig) -> nn.Module:
    bnb = _bnb()
    bias = linear.bias is not None
    if config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=config.llm_int8_threshold,
        )
        weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            quant_type=config.bnb_4bit_quant_type,
            compress_statistics=config.bnb_4bit_use_double_quant,
            module=layer,
        )
    layer.weight = weight
    if bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer.requires_grad_(False)
    return layer


def replace_with_bnb_layers(
    model: nn.Module,
    bnb_quantization_config: BnbQuantizationConfig,
    modules_to_not_convert: list[str] | None = None,
    current_key_name: list[str] | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a bitsandbytes layer holding its weights,
    except those named in ``modules_to_not_convert``. Weights are quantized when the layer is
    put on its device (:func:`quantize_in_place`). Returns the model.
    """
    skip = list(modules_to_not_convert or [])
    prefix = ".".join(current_key_name or [])
    replaced = 0
    for name, module in list(model.named_modules(prefix=prefix)):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not _skipped(full, skip):
                setattr(module, child_name, _quantized_linear(child, bnb_quantization_config))
                replaced += 1
    if not replaced:
        logger.warning("replace_with_bnb_layers found no nn.Linear to quantize in %s", type(model).__name__)
    return model


def quantize_in_place(model: nn.Module, device: Device | None = "cpu") -> None:
    """Quantize the weights of every bitsandbytes layer of ``model`` that is not on ``meta``, moving them
    to ``device`` (``None``: where each layer's weight already is)."""
    bnb = _bnb()
    for module in model.modules():
        if (
            isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
            and module.weight.device.type != "meta"
        ):
            module.to(module.weight.device if device is None else device)


def _device_map(
    model: nn.Module,
    config: BnbQuantizationConfig,
    device_map: Any,
    max_memory: Any,
    no_split_module_classes: list[str] | None,
) -> dict[str, Device]:
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, Mapping):
        return dict(device_map)
    if device_map not in STRATEGIES:
        raise ValueError(f"device_map={device_map!r} must be a dict or one of {list(STRATEGIES)}")
    bnb = _bnb()
    special: dict[str, DtypeLike] = {
        f"{name}.weight": config.target_dtype
        for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    }
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model,
            max_memory,
            no_split_module_classes,
            special_dtypes=special,
            low_zero=device_map == "balanced_low_0",
        )
    return infer_auto_device_map(model, max_memory, no_split_module_classes, special_dtypes=special)


def load_and_quantize_model(
    model: nn.Module,
    bnb_quantization_config: BnbQuantizationConfig,
    weights_location: PathLike | None = None,
    device_map: dict[str, Device] | str | None = None,
    no_split_module_classes: list[str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: PathLike | None = None,
    offload_state_dict: bool = False,
) -> nn.Module:
    """Quantize ``model``'s linear layers to 8 or 4 bits and load its weights, placed by ``device_map``.

    A model with real weights is quantized as it is; a model built with
    :func:`~hasten.init_empty_weights` loads ``weights_location`` (a safetensors / ``.bin`` file,
    folder or index), each layer quantized as its weights arrive. Unquantized modules take
    ``torch_dtype`` (``keep_in_fp32_modules`` stay float32). Disk offload of quantized layers is
    not supported: their packed weights and statistics do not fit the offload format.
    """
    config = bnb_quantization_config
    skip = config.skip_modules if config.skip_modules is not None else get_keys_to_not_convert(model)
    keep_fp32 = list(config.keep_in_fp32_modules or [])
    on_meta = any(parameter.device.type == "meta" for parameter in model.parameters())
    if on_meta and weights_location is None:
        raise ValueError(
            "the model is on the meta device (init_empty_weights) but weights_location is None: pass the "
            "checkpoint "
            "to load the weights from"
        )
    with init_empty_weights(include_buffers=False) if on_meta else contextlib.nullcontext():
        replace_with_bnb_layers(model, config, modules_to_not_convert=skip + keep_fp32)
    _cast_unquantized(model, config, keep_fp32)
    placement = get_quantized_model_device_map(model, config, device_map, max_memory, no_split_module_classes)
    if on_meta:
        assert weights_location is not None
        load_checkpoint_in_model(
            model,
            weights_location,
            device_map=placement,
            dtype=config.torch_dtype,
            offload_folder=offload_folder,
            offload_state_dict=offload_state_dict,
            keep_in_fp32_modules=keep_fp32,
        )
    quantize_in_place(model, device=None)
    devices = set(placement.values())
    if len(devices) > 1:
        return dispatch_model(model, placement, offload_dir=offload_folder)
    target = next(iter(devices))
    if str(target) != "cpu":
        model.to(target)
    return model


def _cast_unquantized(model: nn.Module, config: BnbQuantizationConfig, keep_fp32: list[str]) -> None:
    bnb = _bnb()
    dtype = config.torch_dtype
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            continue
        target = torch.float32 if _skipped(name, keep_fp32) else dtype
        if target is None:
            continue
        for key, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.is_floating_point() and parameter.dtype != target:
                module._parameters[key] = nn.Parameter(
                    parameter.data.to(target), requires_grad=parameter.requires_grad
                )


def get_quantized_model_device_map(
    model: nn.Module,
    bnb_quantization_config: BnbQuantizationConfig,
    device_map: dict[str, Device] | str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    no_split_module_classes: list[str] | None = None,
) -> dict[str, Device]:
    """Where each module of a model with bitsandbytes layers goes, the quantized weights counted at
    their quantized size.

    ``device_map`` may be a dict (checked), ``None`` (everything on the CPU, where bitsandbytes'
    CPU backend runs; Accelerate requires a GPU) or a strategy: ``"auto"``, ``"balanced"``,
    ``"balanced_low_0"``, ``"sequential"``.

    Raises:
        ValueError: an unknown strategy, or a map that sends a quantized layer to disk.
    """
    placement = _device_map(model, bnb_quantization_config, device_map, max_memory, no_split_module_classes)
    if "disk" in placement.values():
        raise ValueError(
            f"device_map sends {[k for k, v in placement.items() if v == 'disk']} to disk; quantized layers "
            "cannot be offloaded to disk. Give the CPU enough max_memory, or skip those modules from "
            "quantization"
        )
    return placement


def get_parameter_device(parameter: nn.Module) -> torch.device:
    """The device of the first parameter of ``parameter`` (a module).

    Raises:
        ValueError: the module has no parameters.
    """
    first = next(parameter.parameters(), None)
    if first is None:
        raise ValueError(f"{type(parameter).__name__} has no parameters, so it has no parameter device.")
    return first.device


def quantize_and_offload_8bit(
    model: nn.Module,
    param: torch.Tensor,
    param_name: str,
    new_dtype: DtypeLike | None,
    offload_folder: PathLike,
    offload_index: dict[str, Any],
    fp16_statistics: torch.Tensor | None,
) -> None:
    """Quantize the weight ``param_name`` of an 8-bit layer of ``model`` to int8 (unless it already is:
    then ``fp16_statistics`` holds its scales) and write the weight and its scales (``...SCB``) to
    ``offload_folder``, recorded in ``offload_index``; the model keeps a ``meta`` placeholder.

    Weights are quantized on the CPU (bitsandbytes' CPU backend), so no GPU is needed.
    """
    from hasten.utils.offload import offload_weight

    scales_name = param_name.replace("weight", "SCB")
    if fp16_statistics is None:
        set_module_tensor_to_device(model, param_name, "cpu", dtype=new_dtype, value=param)
        owner = recursive_getattr(model, param_name.rpartition(".")[0]) if "." in param_name else model
        leaf = param_name.rpartition(".")[2]
        parameters: dict[str, Any] = owner._parameters
        quantized = parameters[leaf].to("cpu")  # bitsandbytes' Int8Params quantize when moved
        quantized.requires_grad = False
        parameters[leaf] = quantized
        offload_weight(quantized, param_name, offload_folder, index=offload_index)
        if getattr(quantized, "SCB", None) is not None:
            offload_weight(quantized.SCB, scales_name, offload_folder, index=offload_index)
    else:
        offload_weight(param, param_name, offload_folder, index=offload_index)
        offload_weight(fp16_statistics, scales_name, offload_folder, index=offload_index)
    set_module_tensor_to_device(model, param_name, "meta", dtype=new_dtype, value=torch.empty(*param.size()))
