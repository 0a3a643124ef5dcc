"""Load checkpoints into models: each tensor streamed straight to its final device, dtype or disk.

:func:`load_checkpoint_in_model` first reads every header and checks names and
shapes against the model, so a bad checkpoint (missing shard, corrupt file,
wrong shape, strict key mismatch) raises before the model is touched. It then
walks the tensors once: each is placed where the device map says, cast where
``dtype`` says (floating tensors only; ``keep_in_fp32_modules`` stay fp32), and
entries mapped to ``"disk"`` are left in the safetensors file itself when their
dtype is unchanged (recorded in the offload index, never read). CPU tensors
are views of a private mapping of the file, so a load holds one copy of the
weights at most and a model on ``meta`` with ``device_map=None`` loads too.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from hasten.utils.checkpoint_reader import SafetensorsFile, load_bin
from hasten.utils.constants import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from hasten.utils.device_map import check_tied_parameters_on_same_device
from hasten.utils.errors import CheckpointError
from hasten.utils.memory import clear_device_cache
from hasten.utils.modeling import find_tied_parameters, retie_parameters, set_module_tensor_to_device
from hasten.utils.offload import offload_weight, save_offload_index
from hasten.utils.progress import Progress
from hasten.utils.typing import Device, PathLike

logger = logging.getLogger(__name__)


def checkpoint_files(checkpoint: PathLike) -> list[Path]:
    """The weight files a checkpoint path stands for: a file, an index, or a folder holding either.

    Shard names read from an index must stay inside its folder.

    Raises:
        CheckpointError: nothing loadable is there, the folder is ambiguous, an index is malformed,
            names a missing shard, or points outside its folder.
    """
    path = Path(checkpoint)
    if path.is_dir():
        for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
            if (path / name).is_file():
                return [path / name]
        indexes = sorted(p for p in path.iterdir() if p.name.endswith(".index.json"))
        if not indexes:
            raise CheckpointError(
                f"{path} holds no {SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or *.index.json; pass a checkpoint "
                "file, "
                "an index, or a folder with one of them."
            )
        preferred = [p for p in indexes if p.name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)]
        if len(indexes) > 1 and len(preferred) != 1:
            raise CheckpointError(
                f"{path} holds several indexes {[p.name for p in indexes]}; pass the one to load."
            )
        path = (preferred or indexes)[0]
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist (expected a file, an index or a folder).")
    if not path.name.endswith(".json"):
        return [path]
    return _shards_of_index(path)


def _shards_of_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Index {index_path} is not readable JSON: {error}") from None
    weight_map = index.get("weight_map", index) if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"Index {index_path} has no weight_map of tensor name -> shard file name.")
    folder = index_path.parent.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = (folder / name).resolve()
        if not shard.is_relative_to(folder):
            raise CheckpointError(
                f"Index {index_path} names shard {name!r}, which resolves to {shard}, outside the "
                "checkpoint folder "
                f"{folder}; refusing to read it."
            )
        if not shard.is_file():
            raise CheckpointError(f"Index {index_path} names shard {name!r}, but {shard} does not exist.")
        shards.append(shard)
    return shards


class _Checkpoint:
    """The tensors of one checkpoint file, lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.safetensors = SafetensorsFile(path) if path.suffix == ".safetensors" else None
        self._bin = None if self.safetensors is not None else load_bin(path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.safetensors is not None:
            return {name: info.shape for name, info in self.safetensors.infos.items()}
        assert self._bin is not None
        return {name: tuple(tensor.shape) for name, tensor in self._bin.items()}

    def tensor(self, name: str) -> torch.Tensor:
        if self.safetensors is not None:
            return self.safetensors.tensor(name)
        assert self._bin is not None
        return self._bin[name]

    def release(self, name: str) -> None:
        if self.safetensors is not None:
            self.safetensors.release(name)


def _device_lookup(device_map: Mapping[str, Device]) -> Any:
    def device_of(name: str) -> Device:
        prefix = name
        while True:
            if prefix in device_map:
                return device_map[prefix]
            if not prefix:
                raise CheckpointError(
                    f"No device for {name!r}: device_map names none of its modules (keys: "
                    f"{sorted(device_map)[:8]}…)."
                )
            prefix = prefix.rpartition(".")[0]

    return device_of


def load_state_dict(
    checkpoint_file: PathLike, device_map: Mapping[str, Device] | None = None
) -> dict[str, torch.Tensor]:
    """Read one checkpoint file into a state dict, each tensor on the device ``device_map`` gives it.

    CPU tensors (and those mapped to ``"disk"``, left unread) are views of the file that are read
    on first touch; ``.bin`` files are read with ``weights_only=True`` and memory-mapped.
    """
    checkpoint = _Checkpoint(Path(checkpoint_file))
    device_of = _device_lookup(device_map) if device_map is not None else None
    state = {}
    for name in checkpoint.shapes():
        tensor = checkpoint.tensor(name)
        device = device_of(name) if device_of is not None else "cpu"
        state[name] = tensor if device in ("cpu", "disk") else tensor.to(device)
    return state


def _in_fp32_module(name: str, keep_in_fp32_modules: list[str]) -> bool:
    dotted = f".{name}."
    return any(f".{module}." in dotted for module in keep_in_fp32_modules)


def _target_dtype(
    name: str, tensor_dtype: torch.dtype, dtype: torch.dtype | None, keep_in_fp32_modules: list[str] | None
) -> torch.dtype | None:
    if dtype is None or not tensor_dtype.is_floating_point:
        return None
    if keep_in_fp32_modules and _in_fp32_module(name, keep_in_fp32_modules):
        return torch.float32
    return dtype


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    candidate = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(candidate, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. torch.float16 or 'bfloat16'.")
    return candidate


@dataclass
class _Plan:
    checkpoints: list[_Checkpoint]
    missing: list[str]
    unexpected: list[str]


def _plan(model: nn.Module, files: list[Path], strict: bool) -> _Plan:
    """Open every file and check names and shapes against the model, changing nothing."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    checkpoints, found, mismatches = [], set(), []
    for path in files:
        checkpoint = _Checkpoint(path)
        checkpoints.append(checkpoint)
        for name, shape in checkpoint.shapes().items():
            found.add(name)
            if name in expected and expected[name] != shape:
                mismatches.append(
                    f"{name}: checkpoint {list(shape)} in {path.name}, model {list(expected[name])}"
                )
    if mismatches:
        raise CheckpointError(
            "The checkpoint does not fit the model; nothing was loaded. Shape mismatches: "
            f"{'; '.join(mismatches[:10])}"
            + (f" (and {len(mismatches) - 10} more)" if len(mismatches) > 10 else "")
        )
    tied_found = {
        name for group in find_tied_parameters(model) if found.intersection(group) for name in group
    }
    statistics = {name for name in found if name.endswith(".SCB")}  # 8-bit scales stored beside their weights
    plan = _Plan(
        checkpoints, sorted(set(expected) - found - tied_found), sorted(found - set(expected) - statistics)
    )
    if strict and (plan.missing or plan.unexpected):
        raise CheckpointError(
            "strict=True and the checkpoint's keys differ from the model's; nothing was loaded. Missing "
            "from the "
            f"checkpoint: {plan.missing[:20]}; not in the model: {plan.unexpected[:20]}. Pass strict=False "
            "to load "
            "the matching part."
        )
    return plan


def _place(
    model: nn.Module,
    name: str,
    checkpoint: _Checkpoint,
    device: Device,
    new_dtype: torch.dtype | None,
    statistics: torch.Tensor | None,
) -> None:
    tensor = checkpoint.tensor(name)
    set_module_tensor_to_device(
        model, name, device, value=tensor, dtype=new_dtype, fp16_statistics=statistics, clear_cache=False
    )
    copied = (new_dtype is not None and new_dtype != tensor.dtype) or str(device) not in ("cpu", "meta")
    if copied:
        checkpoint.release(name)


def _offload(
    model: nn.Module,
    name: str,
    checkpoint: _Checkpoint,
    new_dtype: torch.dtype | None,
    folder: Path,
    index: dict[str, Any],
) -> None:
    tensor = checkpoint.tensor(name)
    final_dtype = new_dtype or tensor.dtype
    set_module_tensor_to_device(model, name, "meta", dtype=final_dtype, clear_cache=False)
    if checkpoint.safetensors is not None and final_dtype == tensor.dtype:
        # Leave it in the checkpoint file: the offload index points there, nothing is read or copied.
        index[name] = {
            "safetensors_file": str(checkpoint.path),
            "weight_name": name,
            "dtype": str(tensor.dtype).replace("torch.", ""),
        }
        return
    offload_weight(tensor.to(final_dtype), name, str(folder), index=index)
    checkpoint.release(name)


def _load_mapped(
    model: nn.Module,
    plan: _Plan,
    device_map: Mapping[str, Device] | None,
    offload_folder: Path | None,
    dtype: torch.dtype | None,
    offload_buffers: bool,
    keep_in_fp32_modules: list[str] | None,
) -> dict[str, Any]:
    model_keys = set(model.state_dict())
    buffers = {name for name, _ in model.named_buffers()}
    current = {name: tensor.device for name, tensor in model.state_dict().items()}
    device_of = _device_lookup(device_map) if device_map is not None else None
    offload_index: dict[str, Any] = {}
    total = sum(len(checkpoint.shapes()) for checkpoint in plan.checkpoints)
    with Progress(total, "Loading checkpoint") as progress:
        for checkpoint in plan.checkpoints:
            _load_file(
                model,
                checkpoint,
                model_keys,
                buffers,
                current,
                device_of,
                offload_folder,
                dtype,
                offload_buffers,
                keep_in_fp32_modules,
                offload_index,
                progress,
            )
    return offload_index


def _load_file(
    model: nn.Module,
    checkpoint: _Checkpoint,
    model_keys: set[str],
    buffers: set[str],
    current: dict[str, torch.device],
    device_of: Callable[[str], Device] | None,
    offload_folder: Path | None,
    dtype: torch.dtype | None,
    offload_buffers: bool,
    keep_in_fp32_modules: list[str] | None,
    offload_index: dict[str, Any],
    progress: Progress,
) -> None:
    shapes = checkpoint.shapes()
    for name in shapes:
        progress.update()
        if name not in model_keys:
            continue
        if device_of is not None:
            device = device_of(name)
        else:
            device = "cpu" if current[name].type == "meta" else current[name]
        tensor_dtype = (
            checkpoint.tensor(name).dtype
            if checkpoint.safetensors is None
            else checkpoint.safetensors.infos[name].dtype
        )
        new_dtype = _target_dtype(name, tensor_dtype, dtype, keep_in_fp32_modules)
        if device == "disk" and (offload_buffers or name not in buffers):
            assert offload_folder is not None
            _offload(model, name, checkpoint, new_dtype, offload_folder, offload_index)
            continue
        statistics_name = name[: -len("weight")] + "SCB" if name.endswith("weight") else None
        statistics = (
            checkpoint.tensor(statistics_name)
            if statistics_name in shapes and tensor_dtype == torch.int8
            else None
        )
        _place(model, name, checkpoint, "cpu" if device == "disk" else device, new_dtype, statistics)


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: PathLike,
    device_map: dict[str, Device] | None = None,
    offload_folder: PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: list[str] | None = None,
    offload_8bit_bnb: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
) -> None:
    """Load a checkpoint (file, index, or folder) into ``model``, in place, tensor by tensor.

    Args:
        device_map: where each module's tensors go (``"disk"`` entries land in ``offload_folder``);
            ``None`` keeps each tensor on its current device (``meta`` tensors load onto the CPU).
        dtype: cast floating-point tensors to this dtype (integer and bool tensors are left alone).
        offload_state_dict: accepted for compatibility; CPU weights are memory-mapped views of the
            checkpoint already, so the load never holds two copies and no staging folder is needed.
        keep_in_fp32_modules: modules (dotted names) whose floating tensors stay in float32.
        offload_8bit_bnb: quantize disk-bound ``nn.Linear`` weights to 8 bits while offloading.
        strict: raise when the checkpoint's keys and the model's differ (before loading anything).
        broadcast_from_rank0: read the files on rank 0 only and broadcast the weights to every rank.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt, escapes its folder, or does not fit the model;
            raised before the model is changed.
        ValueError: the device map sends weights to disk without ``offload_folder``, or splits tied weights.
    """
    dtype = _parse_dtype(dtype)
    tied = find_tied_parameters(model)
    if device_map is not None:
        check_tied_parameters_on_same_device(tied, device_map)
        if "disk" in device_map.values() and offload_folder is None:
            raise ValueError(
                f"device_map sends {[k for k, v in device_map.items() if v == 'disk']} to 'disk'; pass "
                "offload_folder=<folder> to keep their weights in."
            )
    if offload_8bit_bnb:
        raise ValueError(
            "offload_8bit_bnb=True: hasten does not write 8-bit quantized weights to disk (their statistics "
            "do not "
            "fit the offload format). Keep quantized layers off disk with load_and_quantize_model and a "
            "larger "
            "max_memory, or offload them unquantized."
        )
    if _is_sharded_with_dtensors(model):
        _load_into_dtensors(
            model, checkpoint_files(checkpoint), strict, full_state_dict, broadcast_from_rank0
        )
        return
    if broadcast_from_rank0 and device_map is None and dist.is_initialized() and dist.get_world_size() > 1:
        plan = _broadcast_checkpoint(model, checkpoint, strict, dtype, keep_in_fp32_modules)
        retie_parameters(model, tied)
        _report(model, checkpoint, plan)
        return
    plan = _plan(model, checkpoint_files(checkpoint), strict)
    folder = Path(offload_folder) if offload_folder is not None else None
    if folder is not None and device_map is not None and "disk" in device_map.values():
        folder.mkdir(parents=True, exist_ok=True)
    offload_index = _load_mapped(
        model, plan, device_map, folder, dtype, offload_buffers, keep_in_fp32_modules
    )
    if offload_index:
        assert folder is not None
        save_offload_index(offload_index, str(folder))
    retie_parameters(model, tied)
    clear_device_cache()
    _report(model, checkpoint, plan)


def _report(model: nn.Module, checkpoint: PathLike, plan: _Plan) -> None:
    if plan.unexpected:
        logger.warning(
            "%d weights of %s are not in %s and were not used: %s",
            len(plan.unexpected),
            checkpoint,
            type(model).__name__,
            plan.unexpected[:20],
        )
    if plan.missing:
        logger.warning(
            "%d weights of %s were not in %s and keep their current values: %s",
            len(plan.missing),
            type(model).__name__,
            checkpoint,
            plan.missing[:20],
        )


_CHUNK_BYTES = 256 * 1024 * 1024


def _broadcast_checkpoint(
    model: nn.Module,
    checkpoint: PathLike,
    strict: bool,
    dtype: torch.dtype | None,
    keep_in_fp32_modules: list[str] | None,
) -> _Plan:
    """Rank 0 reads and validates; every rank gets its outcome, then the tensors in per-dtype chunks."""
    outcome: list[Any] = [None]
    plan: _Plan | None = None
    if dist.get_rank() == 0:
        try:
            plan = _plan(model, checkpoint_files(checkpoint), strict)
            model_keys = set(model.state_dict())
            entries = [
                (name, tuple(c.tensor(name).shape), c.tensor(name).dtype)
                for c in plan.checkpoints
                for name in c.shapes()
                if name in model_keys
            ]
            outcome = [(entries, plan.missing, plan.unexpected)]
        except CheckpointError as error:
            outcome = [error]
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], CheckpointError):
        raise outcome[0]
    entries, missing, unexpected = outcome[0]
    sources = {name: c for c in plan.checkpoints for name in c.shapes()} if plan is not None else {}
    current = {name: tensor.device for name, tensor in model.state_dict().items()}
    by_dtype: dict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape, tensor_dtype in entries:
        by_dtype.setdefault(tensor_dtype, []).append((name, shape))
    for tensor_dtype, group in by_dtype.items():
        for chunk in _chunks(group, tensor_dtype.itemsize):
            sizes = [_numel(shape) for _, shape in chunk]
            if dist.get_rank() == 0:
                buffer = torch.cat([sources[name].tensor(name).reshape(-1) for name, _ in chunk])
            else:
                buffer = torch.empty(sum(sizes), dtype=tensor_dtype)
            dist.broadcast(buffer, src=0)
            for (name, shape), piece in zip(chunk, torch.split(buffer, sizes)):
                device = "cpu" if current[name].type == "meta" else current[name]
                new_dtype = _target_dtype(name, tensor_dtype, dtype, keep_in_fp32_modules)
                set_module_tensor_to_device(
                    model, name, device, value=piece.view(shape), dtype=new_dtype, clear_cache=False
                )
    return plan if plan is not None else _Plan([], missing, unexpected)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _chunks(
    group: list[tuple[str, tuple[int, ...]]], itemsize: int
) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    chunk: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for entry in group:
        nbytes = _numel(entry[1]) * itemsize
        if chunk and size + nbytes > _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += nbytes
    if chunk:
        yield chunk


def _is_sharded_with_dtensors(model: nn.Module) -> bool:
    # A model can only hold DTensors once torch.distributed.tensor is imported; importing it here
    # just to look would cost ~40 MB of resident memory on every load.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is None:
        return False
    dtensor = dtensor_module.DTensor
    return any(isinstance(parameter, dtensor) for parameter in model.parameters())


def _load_into_dtensors(
    model: nn.Module, files: list[Path], strict: bool, full_state_dict: bool, broadcast_from_rank0: bool
) -> None:
    """FSDP2 / DTensor models: hand the full state dict to torch's distributed state-dict loader."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    on_rank0 = not broadcast_from_rank0 or dist.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    if on_rank0:
        for path in files:
            state.update(load_state_dict(path))
    options = StateDictOptions(
        full_state_dict=full_state_dict, strict=strict, broadcast_from_rank0=broadcast_from_rank0
    )
    set_model_state_dict(model, cast(Any, state), options=options)
