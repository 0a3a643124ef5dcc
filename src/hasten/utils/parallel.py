"""Saving, loading and unwrapping models across processes.

``save`` writes from one process (the main one, or the local main of each node) through a
temporary file, so a crash never leaves a truncated checkpoint. ``load`` never executes
pickled code: it is ``torch.load(weights_only=True)`` with numpy arrays (RNG states) allowed.
"""

from __future__ import annotations

import codecs
import io
import sys
import warnings
from collections.abc import Mapping
from typing import IO, Any, cast

import numpy as np
import torch
from torch import nn

from hasten.state import PartialState
from hasten.utils.atomic import atomic_path
from hasten.utils.compilation import is_compiled_module
from hasten.utils.typing import PathLike

FileLike = PathLike | IO[bytes]


def wait_for_everyone() -> None:
    """Block until every process reaches this point (a no-op on one process)."""
    PartialState().wait_for_everyone()


def _split_aliases(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``state_dict`` with each aliased tensor kept once (under its first name), contiguous, and the
    aliases dropped (alias -> the name kept).

    An alias is the same view of the same storage (offset, shape, strides, dtype). Views that overlap
    without being the same are saved as copies, since safetensors refuses tensors sharing memory.
    """
    first: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[torch.device, int]] = set()
    result: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or value.device.type == "meta" or not value.numel():
            result[name] = value
            continue
        storage = (value.device, value.untyped_storage().data_ptr())
        view = (*storage, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if view in first:
            dropped[name] = first[view]
            continue
        first[view] = name
        result[name] = value.clone() if storage in storages else value.contiguous()
        storages.add(storage)
    return result, dropped


def without_aliases(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each shared tensor kept once, under its first name (safetensors refuses
    aliases)."""
    return _split_aliases(state_dict)[0]


def clean_state_dict_for_safetensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` ready for safetensors: each aliased tensor (tied weights) kept once, every tensor
    contiguous. Warns naming the aliases it drops. ``state_dict`` itself is not changed.
    """
    result, dropped = _split_aliases(state_dict)
    if dropped:
        warnings.warn(
            f"Removed shared tensor {set(dropped)} while saving. This should be OK, but check by verifying "
            "that you don't receive any warning while reloading. Each is the same tensor as the one kept "
            f"({', '.join(f'{alias} -> {kept}' for alias, kept in dropped.items())}); tie them again after "
            "loading (e.g. `retie_parameters` or the model's `tie_weights()`).",
            UserWarning,
            stacklevel=2,
        )
    return result


def _write(obj: Any, f: FileLike, safe_serialization: bool) -> None:
    if safe_serialization:
        from safetensors.torch import save, save_file

        if not isinstance(obj, Mapping) or not all(isinstance(value, torch.Tensor) for value in obj.values()):
            raise TypeError(
                "save(safe_serialization=True) needs a dict of tensors (a state_dict), not "
                f"{type(obj).__name__}; "
                "save other objects with safe_serialization=False"
            )
        tensors = clean_state_dict_for_safetensors(obj)
        if isinstance(f, (io.IOBase, io.BufferedIOBase)) or hasattr(f, "write"):
            f.write(save(tensors, metadata={"format": "pt"}))
            return
        with atomic_path(f) as temporary:
            save_file(tensors, str(temporary), metadata={"format": "pt"})
        return
    if hasattr(f, "write"):
        torch.save(obj, f)
        return
    with atomic_path(f) as temporary:
        torch.save(obj, temporary)


def save(obj: Any, f: FileLike, save_on_each_node: bool = False, safe_serialization: bool = False) -> None:
    """Save ``obj`` from the main process only (or the local main process of each node), crash-safely.

    Args:
        obj: what to save; a state dict when ``safe_serialization``.
        f: a path (written to a temporary name, then renamed) or a binary file object.
        save_on_each_node: write on every node (for nodes that do not share a file system).
        safe_serialization: write safetensors (tensors only, no pickle) instead of ``torch.save``.
    """
    state = PartialState()
    writer = state.is_local_main_process if save_on_each_node else state.is_main_process
    if writer:
        _write(obj, f, safe_serialization)


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [
            getattr(dtypes, name)
            for name in ("UInt32DType", "Float64DType", "Int64DType")
            if hasattr(dtypes, name)
        ]
    return allowed


def load(f: FileLike, map_location: Any = None, **kwargs: Any) -> Any:
    """``torch.load`` that executes no pickled code: ``weights_only=True`` unless you pass otherwise.

    numpy arrays (as found in saved RNG states) are allowed for the duration of this call only.
    Passing ``weights_only=False`` runs arbitrary code from the file: only do it for files you trust.
    """
    kwargs.setdefault("weights_only", True)
    if not kwargs["weights_only"]:
        return torch.load(f, map_location=map_location, **kwargs)
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(f, map_location=map_location, **kwargs)


def _wrapper_types() -> tuple[type, ...]:
    wrappers: list[type] = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers.append(FullyShardedDataParallel)
    if "deepspeed" in sys.modules:  # no DeepSpeedEngine exists before deepspeed is imported: never import it
        from deepspeed import DeepSpeedEngine

        wrappers.append(DeepSpeedEngine)
    return tuple(wrappers)


def _unwrap_recursively(module: nn.Module, wrappers: tuple[type, ...]) -> nn.Module:
    while isinstance(module, wrappers) or (
        hasattr(module, "module") and isinstance(module.module, nn.Module)
    ):
        module = module.module  # type: ignore[assignment]
    for name, child in list(module.named_children()):
        setattr(module, name, _unwrap_recursively(child, wrappers))
    return module


def extract_model_from_parallel(
    model: nn.Module, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True, recursive: bool = False
) -> nn.Module:
    """The model inside its DDP / DataParallel / FSDP / DeepSpeed wrappers (and ``torch.compile``).

    Args:
        model: the wrapped model.
        keep_fp32_wrapper: keep the forward that converts mixed-precision outputs to fp32;
            ``False`` restores the model's original ``forward``.
        keep_torch_compile: return the compiled wrapper around the unwrapped model instead of
            the bare model.
        recursive: also unwrap every submodule held as ``.module`` (e.g. per-layer FSDP on XLA).
    """
    wrappers = _wrapper_types()
    compiled = model if is_compiled_module(model) or "_orig_mod" in model.__dict__ else None
    if compiled is not None:  # torch.compile's wrapper, or the copy compile_regions made
        original = compiled.__dict__.get("_orig_mod")
        model = cast(nn.Module, original if original is not None else compiled._orig_mod)
    while isinstance(model, wrappers):
        model = model.module  # type: ignore[assignment]
    if recursive:
        model = _unwrap_recursively(model, wrappers)
    if not keep_fp32_wrapper:
        original = model.__dict__.pop("_original_forward", None)
        if original is not None:
            forward = model.forward
            while hasattr(forward, "__wrapped__") and forward != original:
                forward = forward.__wrapped__
            if (
                getattr(forward, "__self__", None) is model
                and getattr(forward, "__func__", None) is type(model).forward
            ):
                del model.forward  # the class's own forward again, with no self-reference left behind
            else:
                model.forward = forward.__get__(model) if not hasattr(forward, "__self__") else forward
    if keep_torch_compile and compiled is not None:
        if "_orig_mod" in compiled.__dict__:
            compiled.__dict__["_orig_mod"] = model
        else:
            compiled._orig_mod = model
        return compiled
    return model


def model_has_dtensor(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (tensor parallel or FSDP2 sharded)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def get_model_tp_size(model: nn.Module) -> int | None:
    """The tensor-parallel degree a transformers model was sharded with, or ``None`` when it was not.

    transformers < 5 records it as ``model.tp_size``; transformers 5 in the ``distributed_config``
    of the model's config (an object or a dict).
    """
    tp_size = getattr(model, "tp_size", None)
    if tp_size is not None:
        return int(tp_size)
    distributed_config = getattr(getattr(model, "config", None), "distributed_config", None)
    if isinstance(distributed_config, Mapping):
        found = distributed_config.get("tp_size")
    else:
        found = getattr(distributed_config, "tp_size", None)
    return None if found is None else int(found)


def id_tensor_storage(tensor: torch.Tensor) -> tuple[torch.device, int, int]:
    """(device, storage address, storage bytes): equal for tensors that share one storage.

    All ``meta`` tensors report address 0. Storages whose lifetimes do not overlap may reuse an id.
    """
    try:
        storage = tensor.untyped_storage()
        return tensor.device, storage.data_ptr(), storage.nbytes()
    except (NotImplementedError, RuntimeError):  # tensors without a storage (some wrapper subclasses)
        return tensor.device, 0, tensor.nelement() * tensor.element_size()


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model``, once unwrapped from DDP / FSDP / DeepSpeed / compile, is a PEFT ``PeftModel``."""
    from hasten.utils.imports import is_peft_available

    if not is_peft_available():
        return False
    from peft import PeftModel

    return isinstance(extract_model_from_parallel(model), PeftModel)
