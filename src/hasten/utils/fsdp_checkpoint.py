"""Saving and loading the state of an FSDP model and its optimizer, and merging a sharded checkpoint.

File names and formats are Accelerate's, so either library reads what the other wrote:

=====================  ============================================  =======================================
``state_dict_type``    model                                         optimizer
=====================  ============================================  =======================================
``FULL_STATE_DICT``    ``pytorch_model_fsdp[_i].bin`` (rank 0)       ``optimizer[_i].bin`` (rank 0)
``SHARDED_STATE_DICT`` ``pytorch_model_fsdp_i/`` (DCP folder)        ``optimizer_i/`` (DCP folder)
  with ``use_dcp=False`` ``pytorch_model_fsdp_i_rankR.bin`` per rank  ``optimizer_i_rankR.bin`` per rank
``LOCAL_STATE_DICT``   ``pytorch_model_fsdp[_i]_rankR.bin`` (FSDP1)  as sharded
=====================  ============================================  =======================================

State dicts go through ``torch.distributed.checkpoint.state_dict`` for FSDP1 and FSDP2 alike: a
full state dict is gathered to rank 0 on the CPU, and on loading rank 0 alone reads the file and
broadcasts it. Every file is written crash-safely, and a DCP folder is written beside its final
name and renamed into place once every rank has finished, so a checkpoint exists whole or not at
all. What must exist to load is checked where it is read and the verdict shared, so a missing
file is an error on every rank instead of a hang. Everything loads with ``weights_only=True``.

``merge_fsdp_weights`` (and ``hasten merge-weights``) turns a DCP folder into one
``model.safetensors`` (or ``pytorch_model.bin``) without a process group.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hasten.logging import get_logger
from hasten.state import PartialState
from hasten.utils.atomic import atomic_path
from hasten.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME
from hasten.utils.dataclasses.plugins.fsdp_wrap import require_fsdp1_device
from hasten.utils.fsdp2 import state_of
from hasten.utils.operations import broadcast_object_list
from hasten.utils.parallel import is_peft_model, save

logger = get_logger(__name__)
METADATA = ".metadata"  # the file a DCP checkpoint folder is recognised by


def _kind(plugin: Any) -> str:
    """``FULL_STATE_DICT``, ``SHARDED_STATE_DICT`` or ``LOCAL_STATE_DICT``, after checking FSDP1 can run."""
    if plugin.fsdp_version == 1:
        require_fsdp1_device()
    return str(plugin.state_dict_type.name)


def _options(plugin: Any, num_processes: int, loading: bool = False, **changes: Any) -> Any:
    """``StateDictOptions`` for the plugin: a full state dict gathers to rank 0 on the CPU, and is
    broadcast from rank 0 on loading."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    full = plugin.state_dict_type.name == "FULL_STATE_DICT"
    multi = num_processes > 1
    options = {
        "full_state_dict": full,
        "cpu_offload": (full and multi) or bool(getattr(plugin.state_dict_config, "offload_to_cpu", False)),
        "broadcast_from_rank0": full and multi and loading,
    }
    return StateDictOptions(**{**options, **changes})


def _agree(problem: str | None, state: Any, exception: type[Exception] = FileNotFoundError) -> None:
    """Raise ``exception`` on every rank with the ``problem`` rank 0 found (nothing when it found none)."""
    verdict: list[Any] = [problem]
    if state.num_processes > 1:
        broadcast_object_list(verdict)
    if verdict[0] is not None:
        raise exception(verdict[0])


def _write_file(obj: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; it is written by the matching save (same index).")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _dcp_save(state_dict: dict[str, Any], folder: Path, state: Any) -> None:
    """Save a DCP checkpoint to ``folder`` whole or not at all: written beside it, renamed into place."""
    import torch.distributed.checkpoint as dcp

    partial = folder.with_name(f".{folder.name}.partial")
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    state.wait_for_everyone()
    dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(partial))
    state.wait_for_everyone()
    if state.is_main_process:
        previous = folder.with_name(f".{folder.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        if folder.exists():
            folder.rename(previous)
        partial.rename(folder)
        shutil.rmtree(previous, ignore_errors=True)
    state.wait_for_everyone()


def _dcp_folder(input_dir: Any, name: str) -> Path:
    """Where a DCP checkpoint called ``name`` lies: ``input_dir/name``, or ``input_dir`` itself."""
    folder = Path(input_dir)
    return folder if folder.name == name else folder / name


def _dcp_load(state_dict: dict[str, Any], folder: Path, state: Any) -> None:
    import torch.distributed.checkpoint as dcp

    missing = f"{folder} is not a DCP checkpoint (no {METADATA} file); pass the folder the save wrote into."
    _agree(None if (folder / METADATA).is_file() else missing, state)
    dcp.load(state_dict, storage_reader=dcp.FileSystemReader(folder))


def _indexed(prefix: str, index: int, suffix: str = "") -> str:
    return f"{prefix}{suffix}.bin" if index == 0 else f"{prefix}_{index}{suffix}.bin"


def _local_state_dict(model: torch.nn.Module, apply: Callable[[], Any]) -> Any:
    """Run ``apply`` with FSDP1's model in its ``LOCAL_STATE_DICT`` mode."""
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    with FullyShardedDataParallel.state_dict_type(model, StateDictType.LOCAL_STATE_DICT):
        return apply()


def _save(value: Any, kind: str, state: Any, folder: Path, prefix: str, index: int, use_dcp: bool) -> None:
    """Write a model's or an optimizer's state as ``kind`` says: rank 0's file, a DCP folder holding
    ``{key: value}`` (``key``: ``"model"`` or ``"optimizer"``), or one file per rank."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "FULL_STATE_DICT":
        if state.process_index == 0:
            _write_file(value, folder / _indexed(prefix, index))
        state.wait_for_everyone()
    elif use_dcp:
        _dcp_save({_KEY[prefix]: value}, folder / f"{prefix}_{index}", state)
    else:
        _write_file(value, folder / f"{prefix}_{index}_rank{state.process_index}.bin")


def _load(
    kind: str,
    state: Any,
    broadcast: bool,
    input_dir: Any,
    prefix: str,
    index: int,
    use_dcp: bool,
    template: Callable[[], Any],
) -> Any:
    """Read what :func:`_save` wrote: a full state on rank 0 alone when it is then broadcast (``{}``
    elsewhere), a DCP folder into ``template()``, or this rank's file."""
    if kind == "FULL_STATE_DICT":
        path = Path(input_dir) / _indexed(prefix, index)
        missing = state.is_main_process and not path.is_file()
        _agree(f"{path} does not exist (rank 0 reads it)" if missing else None, state)
        return _read_file(path) if state.is_main_process or not broadcast else {}
    if use_dcp:
        holder = {_KEY[prefix]: template()}
        _dcp_load(holder, _dcp_folder(input_dir, f"{prefix}_{index}"), state)
        return holder[_KEY[prefix]]
    return _read_file(Path(input_dir) / f"{prefix}_{index}_rank{state.process_index}.bin")


_KEY = {FSDP_MODEL_NAME: "model", OPTIMIZER_NAME: "optimizer"}  # the top key of a DCP folder


def save_fsdp_model(
    fsdp_plugin: Any,
    accelerator: Any,
    model: torch.nn.Module,
    output_dir: Any,
    model_index: int = 0,
    adapter_only: bool = False,
    use_dcp: bool = True,
) -> None:
    """Save the FSDP ``model``'s weights to ``output_dir`` as ``fsdp_plugin.state_dict_type`` says.

    Called on every rank. ``adapter_only`` saves only a PEFT model's adapter; ``use_dcp=False``
    saves a sharded state dict as one ``torch.save`` file per rank (no cross-rank traffic, read back
    with ``use_dcp=False`` on the same number of ranks).

    Raises:
        ConfigurationError: FSDP1 on a machine without an accelerator.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    kind = _kind(fsdp_plugin)
    state = state_of(accelerator)
    if kind == "LOCAL_STATE_DICT":
        name = _indexed(FSDP_MODEL_NAME, model_index, f"_rank{state.process_index}")
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        _write_file(_local_state_dict(model, model.state_dict), Path(output_dir) / name)
        return
    peft = adapter_only and is_peft_model(model)
    if peft and kind == "SHARDED_STATE_DICT":
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(model, adapter_name=str(model.active_adapter))
    else:
        options = _options(fsdp_plugin, state.num_processes, ignore_frozen_params=peft)
        weights = get_model_state_dict(model, options=options)
    _save(weights, kind, state, Path(output_dir), FSDP_MODEL_NAME, model_index, use_dcp)


def load_fsdp_model(
    fsdp_plugin: Any,
    accelerator: Any,
    model: torch.nn.Module,
    input_dir: Any,
    model_index: int = 0,
    adapter_only: bool = False,
    use_dcp: bool = True,
) -> Any:
    """Load what :func:`save_fsdp_model` wrote into the FSDP ``model``, on every rank.

    A full state dict is read by rank 0 alone and broadcast. Returns the load result
    (missing and unexpected keys).

    Raises:
        FileNotFoundError: on every rank, when the file or folder to read is not there.
        ConfigurationError: FSDP1 on a machine without an accelerator.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    kind = _kind(fsdp_plugin)
    state = state_of(accelerator)
    state.wait_for_everyone()
    if kind == "LOCAL_STATE_DICT":
        weights = _read_file(
            Path(input_dir) / _indexed(FSDP_MODEL_NAME, model_index, f"_rank{state.process_index}")
        )
        return _local_state_dict(model, lambda: model.load_state_dict(weights))
    peft = adapter_only and is_peft_model(model)
    options = _options(fsdp_plugin, state.num_processes, loading=True, strict=not peft)
    if peft and kind == "SHARDED_STATE_DICT":
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapter = str(model.active_adapter)
        weights = _load(
            kind,
            state,
            False,
            input_dir,
            FSDP_MODEL_NAME,
            model_index,
            True,
            lambda: get_peft_model_state_dict(model, adapter_name=adapter),
        )
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
    else:
        weights = _load(
            kind,
            state,
            options.broadcast_from_rank0,
            input_dir,
            FSDP_MODEL_NAME,
            model_index,
            use_dcp,
            lambda: get_model_state_dict(model, options=options),
        )
        result = set_model_state_dict(model, weights, options=options)
    state.wait_for_everyone()
    return result


def save_fsdp_optimizer(
    fsdp_plugin: Any,
    accelerator: Any,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    output_dir: Any,
    optimizer_index: int = 0,
    use_dcp: bool = True,
) -> None:
    """Save ``optimizer``'s state (keyed by parameter names of the FSDP ``model``) to ``output_dir``.

    Raises:
        ConfigurationError: FSDP1 on a machine without an accelerator.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    kind = _kind(fsdp_plugin)
    state = state_of(accelerator)
    optim_state = get_optimizer_state_dict(
        model, optimizer, options=_options(fsdp_plugin, state.num_processes)
    )
    _save(optim_state, kind, state, Path(output_dir), OPTIMIZER_NAME, optimizer_index, use_dcp)


def load_fsdp_optimizer(
    fsdp_plugin: Any,
    accelerator: Any,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    input_dir: Any,
    optimizer_index: int = 0,
    adapter_only: bool = False,
    use_dcp: bool = True,
) -> None:
    """Load what :func:`save_fsdp_optimizer` wrote into ``optimizer``, on every rank.

    ``adapter_only`` is accepted for Accelerate's signature: the optimizer state holds whatever
    parameters the optimizer trains.

    Raises:
        FileNotFoundError: on every rank, when the file or folder to read is not there.
        ConfigurationError: FSDP1 on a machine without an accelerator.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    kind = _kind(fsdp_plugin)
    state = state_of(accelerator)
    state.wait_for_everyone()
    options = _options(fsdp_plugin, state.num_processes, loading=True)
    optim_state = _load(
        kind,
        state,
        options.broadcast_from_rank0,
        input_dir,
        OPTIMIZER_NAME,
        optimizer_index,
        use_dcp,
        lambda: get_optimizer_state_dict(model, optimizer, options=options),
    )
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    state.wait_for_everyone()


def _read_dcp_whole(folder: Path) -> dict[str, Any]:
    """Every value of a DCP checkpoint, whole, read without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(folder)
    metadata = reader.read_metadata()
    flat: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            flat[key] = torch.empty(item.size, dtype=item.properties.dtype)
        else:
            flat[key] = None  # a pickled object: DCP fills it in
    with warnings.catch_warnings():  # no process group is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(flat, storage_reader=reader, no_dist=True)
    nested: dict[str, Any] = {}
    paths = metadata.planner_data or {}
    for key, value in flat.items():
        target = nested
        path = [str(part) for part in paths.get(key, (key,))]
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return nested


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _missing_checkpoint(folder: Path) -> str:
    message = f"Tried to load from {folder} but couldn't find a valid metadata file ({folder / METADATA})."
    found = [
        name
        for name in (f"{FSDP_MODEL_NAME}_0", f"{OPTIMIZER_NAME}_0")
        if (folder / name / METADATA).is_file()
    ]
    if found:
        message += f" It holds the DCP checkpoints {found}: pass {folder / found[0]} instead."
    return message


def _merge(folder: Path, output: Path, safe_serialization: bool) -> Path:
    merged = _read_dcp_whole(folder)
    if len(merged) == 1 and isinstance(next(iter(merged.values())), dict):
        merged = next(iter(merged.values()))
    merged = _flatten(merged)
    if safe_serialization:
        others = sorted(key for key, value in merged.items() if not isinstance(value, torch.Tensor))
        if others:
            raise ValueError(
                f"{folder} holds values that are not tensors ({others[:5]}), which safetensors cannot store; "
                "merge with safe_serialization=False (--unsafe_serialization)."
            )
    output.mkdir(parents=True, exist_ok=True)
    target = output / (SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME)
    save(merged, target, safe_serialization=safe_serialization)
    logger.info(f"Merged the FSDP weights of {folder} into {target}")
    return target


def merge_fsdp_weights(
    checkpoint_dir: str,
    output_path: str,
    safe_serialization: bool = True,
    remove_checkpoint_dir: bool = False,
) -> Path | None:
    """Merge a sharded (DCP) FSDP checkpoint into one file: ``output_path/model.safetensors``, or
    ``pytorch_model.bin`` when not ``safe_serialization``.

    Reads the whole state on the main process (CPU-bound; needs the model's size in RAM); other
    processes wait. A model folder holds ``{"model": ...}``, which is unwrapped; nested entries (an
    optimizer's state) get dotted names.

    Args:
        checkpoint_dir: the DCP folder (``pytorch_model_fsdp_0`` or ``optimizer_0``).
        output_path: the folder to write the merged file into (created if needed).
        safe_serialization: write safetensors (tensors only) rather than ``torch.save``.
        remove_checkpoint_dir: delete ``checkpoint_dir`` once the merged file is written.

    Returns:
        The merged file's path on the main process, ``None`` on the others.

    Raises:
        ValueError: ``checkpoint_dir`` is not a DCP checkpoint (the message points at the ones inside
            it), or, with ``safe_serialization``, it holds values that are not tensors.
    """
    folder = Path(checkpoint_dir)
    if not (folder / METADATA).is_file():
        raise ValueError(_missing_checkpoint(folder))
    state = PartialState()
    target: Path | None = None
    problem: list[Any] = [None]
    if state.is_main_process:
        try:
            target = _merge(folder, Path(output_path), safe_serialization)
        except ValueError as error:
            problem[0] = str(error)
        if remove_checkpoint_dir and target is not None:
            shutil.rmtree(folder)
    _agree(problem[0], state, ValueError)
    state.wait_for_everyone()
    return target
