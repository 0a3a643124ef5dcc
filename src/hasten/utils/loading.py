"""Load checkpoints into models: each tensor streamed straight to its final device, dtype or disk.

:func:`load_checkpoint_in_model` first reads every header and checks names and
shapes against the model, so a bad checkpoint (missing shard, corrupt file,
wrong shape, strict key mismatch) raises before the model is touched. It then
walks the tensors once: each is placed where the device map says, cast where
``dtype`` says (floating tensors only; ``keep_in_fp32_modules`` stay fp32), and
entries mapped to ``"disk"`` are left in the safetensors file itself when their
dtype is unchanged (recorded in the offload index, never read).

The loaded weights belong to the model. A tensor that already holds memory on
its target device, in its target dtype, is filled in place (the parameter object
stays the same, so an optimizer built before the load trains the loaded values);
any other gets fresh memory of its own (a ``meta`` model, a new device or dtype).
Nothing keeps a view of the file, so it can be overwritten, truncated or deleted
afterwards. ``zero_copy=True`` opts into copy-on-write views of the file instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from hasten.utils.checkpoint_reader import CheckpointFile, checkpoint_files
from hasten.utils.device_map_checks import (
    check_device_map_keys,
    check_devices_present,
    check_tied_parameters_on_same_device,
)
from hasten.utils.errors import CheckpointError
from hasten.utils.memory import clear_device_cache
from hasten.utils.modeling import as_torch_dtype, find_tied_parameters, value_dtype
from hasten.utils.offload import offload_weight, save_offload_index
from hasten.utils.placement import (
    copies_in_place,
    module_tensor,
    retie_parameters,
    set_module_tensor_to_device,
)
from hasten.utils.progress import Progress
from hasten.utils.typing import Device, PathLike

logger = logging.getLogger(__name__)


def _device_lookup(device_map: Mapping[str, Device]) -> Callable[[str], Device]:
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
    checkpoint_file: PathLike, device_map: Mapping[str, Device] | None = None, *, zero_copy: bool = False
) -> dict[str, torch.Tensor]:
    """Read one checkpoint file into a state dict, each tensor on the device ``device_map`` gives it.

    Tensors mapped to ``"disk"`` are returned on the CPU. Every tensor has memory of its own: the
    file can be overwritten or deleted afterwards. ``.bin`` files are read with ``weights_only=True``.

    Args:
        zero_copy: (keyword-only, not in Accelerate) return CPU tensors without copying them. They
            then view a copy-on-write map of the file: writing into the file in place changes them,
            and truncating it (``torch.save`` or ``save_file`` to the same path) kills the process
            with ``SIGBUS`` when they are next read. Replacing the file (``os.replace``) or deleting
            it is safe.
    """
    checkpoint = CheckpointFile(Path(checkpoint_file))
    device_of = _device_lookup(device_map) if device_map is not None else None
    state = {}
    for name in checkpoint.shapes():
        device = device_of(name) if device_of is not None else "cpu"
        if device in ("cpu", "disk"):
            state[name] = checkpoint.view(name) if zero_copy else checkpoint.read(name)
        else:
            state[name] = checkpoint.view(name).to(device)
            checkpoint.release(name)
    if not zero_copy:
        checkpoint.close()
    return state


def _in_fp32_module(name: str, keep_in_fp32_modules: tuple[str, ...]) -> bool:
    dotted = f".{name}."
    return any(f".{module}." in dotted for module in keep_in_fp32_modules)


@dataclass(frozen=True)
class LoadOptions:
    """How one :func:`load_checkpoint_in_model` call places tensors (fixed for the whole load)."""

    dtype: torch.dtype | None = None
    keep_in_fp32_modules: tuple[str, ...] = ()
    device_of: Callable[[str], Device] | None = None
    """The device map as a lookup; ``None`` keeps each tensor where it is (``meta`` loads on the CPU)."""
    offload_folder: Path | None = None
    offload_buffers: bool = False
    zero_copy: bool = False

    def target_dtype(self, name: str, stored: torch.dtype) -> torch.dtype | None:
        """The dtype ``name`` (stored as ``stored``) is cast to, or ``None`` to take the model's."""
        if self.dtype is None:
            return None
        if self.keep_in_fp32_modules and _in_fp32_module(name, self.keep_in_fp32_modules):
            return value_dtype(stored, torch.float32)
        return value_dtype(stored, self.dtype)


def placed_value(
    old: torch.Tensor,
    device: torch.device,
    final: torch.dtype,
    stored: torch.dtype,
    view: Callable[[], torch.Tensor],
    own: Callable[[], torch.Tensor],
    zero_copy: bool = False,
) -> torch.Tensor:
    """The value to hand :func:`set_module_tensor_to_device` so that the model ends up owning its memory.

    A view is enough when the tensor will be copied anyway (into ``old`` in place, or by a cast or
    a move); otherwise the model would adopt the value as it is, so it must own its memory
    (``own``), unless ``zero_copy`` accepts the view.
    """
    if zero_copy or copies_in_place(old, device, final) or stored != final or device.type != "cpu":
        return view()
    return own()


@dataclass
class _Plan:
    checkpoints: list[CheckpointFile]
    missing: list[str]
    unexpected: list[str]


def plan_load(model: nn.Module, files: list[Path], strict: bool) -> _Plan:
    """Open every file and check names and shapes against the model, changing nothing."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    checkpoints, found, mismatches = [], set(), []
    for path in files:
        checkpoint = CheckpointFile(path)
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
            f"from the checkpoint: {plan.missing[:20]}; not in the model: {plan.unexpected[:20]}. Pass "
            "strict=False to load the matching part."
        )
    return plan


def _place(
    model: nn.Module,
    name: str,
    checkpoint: CheckpointFile,
    device: Device,
    new_dtype: torch.dtype | None,
    statistics: torch.Tensor | None,
    zero_copy: bool,
) -> None:
    old = module_tensor(model, name)
    target = torch.device(device) if not isinstance(device, torch.device) else device
    stored = checkpoint.dtype(name)
    final = old.dtype if new_dtype is None else new_dtype
    if (
        statistics is None
        and stored == final
        and target.type == "cpu"
        and copies_in_place(old, target, final)
    ):
        checkpoint.read_into(name, old)  # straight from the file into the parameter's own memory
        torch.autograd.graph.increment_version(old)
        return
    value = placed_value(
        old, target, final, stored, lambda: checkpoint.view(name), lambda: checkpoint.read(name), zero_copy
    )
    set_module_tensor_to_device(
        model, name, target, value=value, dtype=new_dtype, fp16_statistics=statistics, clear_cache=False
    )
    if not zero_copy:
        checkpoint.release(name)


def _offload(
    model: nn.Module,
    name: str,
    checkpoint: CheckpointFile,
    new_dtype: torch.dtype | None,
    folder: Path,
    index: dict[str, Any],
) -> None:
    stored = checkpoint.dtype(name)
    final_dtype = new_dtype or stored
    set_module_tensor_to_device(model, name, "meta", dtype=final_dtype, clear_cache=False)
    if checkpoint.safetensors is not None and final_dtype == stored:
        # Leave it in the checkpoint file: the offload index points there, nothing is read or copied.
        index[name] = {
            "safetensors_file": str(checkpoint.path),
            "weight_name": name,
            "dtype": str(stored).replace("torch.", ""),
        }
        return
    offload_weight(checkpoint.view(name).to(final_dtype), name, str(folder), index=index)
    checkpoint.release(name)


class _Load:
    """The state of one load: what the model holds, and the offload index being built."""

    def __init__(self, model: nn.Module, options: LoadOptions) -> None:
        self.model = model
        self.options = options
        state = model.state_dict()
        self.current = {name: tensor.device for name, tensor in state.items()}
        self.buffers = {name for name, _ in model.named_buffers()}
        self.offload_index: dict[str, Any] = {}

    def file(self, checkpoint: CheckpointFile, progress: Progress) -> None:
        """Place every tensor of ``checkpoint`` that the model has."""
        options = self.options
        shapes = checkpoint.shapes()
        for name in shapes:
            progress.update()
            if name not in self.current:
                continue
            if options.device_of is not None:
                device = options.device_of(name)
            else:
                device = "cpu" if self.current[name].type == "meta" else self.current[name]
            stored = checkpoint.dtype(name)
            new_dtype = options.target_dtype(name, stored)
            if device == "disk" and (options.offload_buffers or name not in self.buffers):
                assert options.offload_folder is not None
                _offload(self.model, name, checkpoint, new_dtype, options.offload_folder, self.offload_index)
                continue
            statistics_name = name[: -len("weight")] + "SCB" if name.endswith("weight") else None
            statistics = (
                checkpoint.read(statistics_name)
                if statistics_name in shapes and stored == torch.int8
                else None
            )
            where = "cpu" if device == "disk" else device
            _place(self.model, name, checkpoint, where, new_dtype, statistics, options.zero_copy)
        if not options.zero_copy:
            checkpoint.close()


def _check_device_map(device_map: Any, offload_folder: PathLike | None) -> None:
    if isinstance(device_map, str):
        raise TypeError(
            f"load_checkpoint_in_model(device_map={device_map!r}): this function takes a dict of module name "
            "-> device. To plan one, call infer_auto_device_map(model, max_memory=...) first, or use "
            f"load_checkpoint_and_dispatch(model, checkpoint, device_map={device_map!r}), which plans and "
            "loads."
        )
    if not isinstance(device_map, Mapping):
        raise TypeError(
            f"device_map must be a dict of module name -> device, not {type(device_map).__name__}"
        )
    check_device_map_keys(device_map)
    check_devices_present(device_map)
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError(
            f"device_map sends {[k for k, v in device_map.items() if v == 'disk']} to 'disk'; pass "
            "offload_folder=<folder> to keep their weights in."
        )


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
    *,
    zero_copy: bool = False,
) -> None:
    """Load a checkpoint (file, index, or folder) into ``model``, in place, tensor by tensor.

    The model owns what it loads. A parameter or buffer that already holds memory on its
    target device, in its target dtype, is filled in place (``model.weight is p`` stays true, so
    an optimizer built before the load trains the loaded values); ``meta`` tensors, and tensors
    moving to another device or dtype, get fresh memory. Nothing views the file afterwards.

    Args:
        device_map: where each module's tensors go (``"disk"`` entries land in ``offload_folder``);
            ``None`` keeps each tensor on its current device (``meta`` tensors load onto the CPU).
        dtype: cast floating-point tensors to this dtype (integer and bool tensors are left alone).
        offload_state_dict: accepted for compatibility; the load reads one tensor at a time into
            its final place, so it never holds two copies and no staging folder is needed.
        keep_in_fp32_modules: modules (dotted names) whose floating tensors stay in float32.
        offload_8bit_bnb: quantize disk-bound ``nn.Linear`` weights to 8 bits while offloading.
        strict: raise when the checkpoint's keys and the model's differ (before loading anything).
        broadcast_from_rank0: read the files on rank 0 only and broadcast the weights to every rank.
        zero_copy: (keyword-only, not in Accelerate) tensors that would get fresh CPU memory (a ``meta``
            model) view the file instead of copying it: no copy, and nothing is read until used. But
            the tensors then view a copy-on-write map of the file: writing into the file in place
            changes the model's weights, and truncating it (``torch.save`` or ``save_file`` to the
            same path) kills the process with ``SIGBUS`` when they are next read. Replacing the file
            (``os.replace``, as hasten's saves do) or deleting it is safe.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt, escapes its folder, or does not fit the model;
            raised before the model is changed.
        TypeError: ``device_map`` is not a dict (``"auto"`` and the other strategies are planned by
            :func:`~hasten.load_checkpoint_and_dispatch`).
        ValueError: the device map sends weights to disk without ``offload_folder``, has keys that
            overlap, or splits tied weights.
    """
    torch_dtype = None if dtype is None else as_torch_dtype(dtype)
    tied = find_tied_parameters(model)
    if device_map is not None:
        _check_device_map(device_map, offload_folder)
        check_tied_parameters_on_same_device(tied, device_map)
    if offload_8bit_bnb:
        raise ValueError(
            "offload_8bit_bnb=True: hasten does not write 8-bit quantized weights to disk (their statistics "
            "do not fit the offload format). Keep quantized layers off disk with load_and_quantize_model and "
            "a larger max_memory, or offload them unquantized."
        )
    options = LoadOptions(
        dtype=torch_dtype,
        keep_in_fp32_modules=tuple(keep_in_fp32_modules or ()),
        device_of=_device_lookup(device_map) if device_map is not None else None,
        offload_folder=Path(offload_folder) if offload_folder is not None else None,
        offload_buffers=offload_buffers,
        zero_copy=zero_copy,
    )
    if _is_sharded_with_dtensors(model):
        _load_into_dtensors(
            model, checkpoint_files(checkpoint), strict, full_state_dict, broadcast_from_rank0
        )
        return
    if broadcast_from_rank0 and device_map is None and dist.is_initialized() and dist.get_world_size() > 1:
        missing, unexpected = _broadcast_checkpoint(model, checkpoint, strict, options)
        retie_parameters(model, tied)
        _report(model, checkpoint, missing, unexpected)
        return
    plan = plan_load(model, checkpoint_files(checkpoint), strict)
    if options.offload_folder is not None and device_map is not None and "disk" in device_map.values():
        options.offload_folder.mkdir(parents=True, exist_ok=True)
    load = _Load(model, options)
    with Progress(sum(len(c.shapes()) for c in plan.checkpoints), "Loading checkpoint") as progress:
        for file in plan.checkpoints:
            load.file(file, progress)
    if load.offload_index:
        assert options.offload_folder is not None
        save_offload_index(load.offload_index, str(options.offload_folder))
    retie_parameters(model, tied)
    clear_device_cache()
    _report(model, checkpoint, plan.missing, plan.unexpected)


def _report(model: nn.Module, checkpoint: PathLike, missing: list[str], unexpected: list[str]) -> None:
    if unexpected:
        logger.warning(
            "%d weights of %s are not in %s and were not used: %s",
            len(unexpected),
            checkpoint,
            type(model).__name__,
            unexpected[:20],
        )
    if missing:
        logger.warning(
            "%d weights of %s were not in %s and keep their current values: %s",
            len(missing),
            type(model).__name__,
            checkpoint,
            missing[:20],
        )


_CHUNK_BYTES = 256 * 1024 * 1024


def _broadcast_checkpoint(
    model: nn.Module, checkpoint: PathLike, strict: bool, options: LoadOptions
) -> tuple[list[str], list[str]]:
    """Rank 0 reads and validates; every rank gets its outcome, then the tensors in per-dtype chunks.

    Returns the missing and unexpected names.
    """
    outcome: list[Any] = [None]
    plan: _Plan | None = None
    if dist.get_rank() == 0:
        try:
            plan = plan_load(model, checkpoint_files(checkpoint), strict)
            model_keys = set(model.state_dict())
            entries = [
                (name, shape, c.dtype(name))
                for c in plan.checkpoints
                for name, shape in c.shapes().items()
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
    for stored, group in by_dtype.items():
        for chunk in _chunks(group, stored.itemsize):
            sizes = [_numel(shape) for _, shape in chunk]
            if dist.get_rank() == 0:
                buffer = torch.cat([sources[name].view(name).reshape(-1) for name, _ in chunk])
            else:
                buffer = torch.empty(sum(sizes), dtype=stored)
            dist.broadcast(buffer, src=0)
            for (name, shape), piece in zip(chunk, torch.split(buffer, sizes)):
                _place_piece(model, name, piece.view(shape), current[name], options)
    if plan is not None:
        for file in plan.checkpoints:
            file.close()
    return missing, unexpected


def _place_piece(
    model: nn.Module, name: str, piece: torch.Tensor, current: torch.device, options: LoadOptions
) -> None:
    """Place one tensor received in a broadcast chunk; fresh tensors get memory of their own, not a view
    of the chunk (tensors sharing one buffer could not be saved with safetensors)."""
    device = torch.device("cpu") if current.type == "meta" else current
    new_dtype = options.target_dtype(name, piece.dtype)
    old = module_tensor(model, name)
    final = old.dtype if new_dtype is None else new_dtype
    value = placed_value(old, device, final, piece.dtype, lambda: piece, piece.clone)
    set_module_tensor_to_device(model, name, device, value=value, dtype=new_dtype, clear_cache=False)


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
    """FSDP2 / DTensor models: hand the full state dict to torch's distributed state-dict loader.

    The full tensors are read into memory of their own: torch may keep each rank's shard as a view
    of them (``assign=True``), and a view of the file would alias it."""
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
