"""Saving, loading and unwrapping models across processes.

``save`` writes from one process (the main one, or the local main of each node) through a
temporary file, so a crash never leaves a truncated checkpoint. ``load`` never executes
pickled code: it is ``torch.load(weights_only=True)`` with numpy arrays (RNG states) allowed.
"""

from __future__ import annotations

import codecs
import io
import sys
from collections.abc import Mapping
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from hasten.state import PartialState
from hasten.utils.atomic import atomic_path
from hasten.utils.typing import PathLike

FileLike = PathLike | IO[bytes]


def wait_for_everyone() -> None:
    """Block until every process reaches this point (a no-op on one process)."""
    PartialState().wait_for_everyone()


def without_aliases(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each shared tensor kept once, under its first name (safetensors refuses
    aliases)."""
    seen: set[tuple[torch.device, int, int]] = set()
    result = {}
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.device.type != "meta" and value.numel():
            storage = value.untyped_storage()
            key = (value.device, storage.data_ptr(), int(value.storage_offset()))
            if key in seen:
                continue
            seen.add(key)
        result[name] = value.contiguous() if isinstance(value, torch.Tensor) else value
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
        tensors = without_aliases(obj)
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


def _compiled(model: nn.Module) -> bool:
    dynamo = getattr(torch, "_dynamo", None)
    optimized = getattr(getattr(dynamo, "eval_frame", None), "OptimizedModule", None)
    return optimized is not None and isinstance(model, optimized)


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
    compiled = model if _compiled(model) else None
    if compiled is not None:
        model = compiled._orig_mod  # type: ignore[assignment]
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
        compiled._orig_mod = model
        return compiled
    return model
