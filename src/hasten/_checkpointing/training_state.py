"""Write and read the generic part of a training state: models (safetensors), optimizers,
schedulers, data-loader positions, grad scaler, RNG states, step and registered objects.

Reading is split in two so that a bad checkpoint changes nothing: :func:`read_state` opens,
reads and checks every file this process needs (raising :class:`CheckpointError` naming the
file and what it expected), then :meth:`ReadState.apply` loads it all, and
:meth:`ReadState.restore_rngs` puts the random streams back last, after anything that draws.

The optimizer files (the largest) are read memory-mapped: :func:`read_state` parses each one and
locates every tensor, and :meth:`ReadState.apply` copies the saved values straight into the
optimizer's current state tensors (the ones its steps update in place; fresh ones when it has none
yet), so the load allocates nothing and nothing views the file afterwards.

Each process's RNG file also holds its data loaders' states (plain data: the epoch, the
position and what fixes the order; see :mod:`hasten.data_loading.progress`) and the step;
Accelerate ignores the extra key, so it still reads these files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hasten._checkpointing import files, rng
from hasten.utils.constants import SCALER_NAME
from hasten.utils.errors import CheckpointError
from hasten.utils.loading import load_checkpoint_in_model, plan_load
from hasten.utils.tree import tree_map

LOADERS_KEY = "dataloaders"
GRADIENTS_KEY = "gradients"
_CUSTOM = re.compile(r"custom_checkpoint_\d+\.pkl")


def write_state(
    folder: Path,
    model_states: list[dict[str, Any] | None],
    optimizers: list[Any],
    schedulers: list[Any],
    dataloaders: list[Any],
    process_index: int,
    step: int,
    scaler: Any = None,
    out: files.AtomicFiles | files.StagedFiles | None = None,
    safe_serialization: bool = True,
    gradients: list[dict[str, Any]] | None = None,
) -> None:
    """Write everything into ``folder`` (which exists) through ``out`` (default: each file atomically).

    Model, optimizer, scheduler, scaler and stateful-loader files come from one process (the
    main one; the local main ones with ``save_on_each_node``); every process writes its RNG file,
    with its ``gradients`` (saved in the middle of an accumulation: what the next step adds to).
    """
    out = out or files.AtomicFiles()
    for index, weights in enumerate(model_states):
        if weights is not None:
            out.put(
                weights,
                folder / files.model_file(index, safe_serialization),
                safe=safe_serialization,
                spread=True,
            )
    for index, optimizer in enumerate(optimizers):
        out.put(optimizer.state_dict(), folder / files.optimizer_file(index), spread=True)
    for index, scheduler in enumerate(schedulers):
        out.put(scheduler.state_dict(), folder / files.scheduler_file(index))
    loader_states = [loader.state_dict() if hasattr(loader, "state_dict") else None for loader in dataloaders]
    for index, (loader, state) in enumerate(zip(dataloaders, loader_states)):
        if state is not None and getattr(loader, "use_stateful_dataloader", False):
            # Accelerate's file for torchdata loaders: torchdata's keys only, so Accelerate reads it too.
            own = {key: value for key, value in state.items() if key not in _PROGRESS_KEYS}
            out.put(own, folder / files.loader_file(index))
    if scaler is not None:
        out.put(scaler.state_dict(), folder / SCALER_NAME)
    states = {"step": step, **rng.capture(), LOADERS_KEY: loader_states}
    if gradients is not None:
        states[GRADIENTS_KEY] = gradients
    out.put(states, folder / files.rng_file(process_index), shared=False)


_PROGRESS_KEYS = ("iteration", "batches_yielded", "generators", "rng_state", "sampler")


def _check_optimizer(state: Any, optimizer: Any, path: Path) -> None:
    groups = optimizer.param_groups
    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
        raise CheckpointError(
            f"{path} does not hold an optimizer state dict (keys 'state' and 'param_groups')."
        )
    saved = [len(group.get("params", ())) for group in state["param_groups"]]
    held = [len(group["params"]) for group in groups]
    if saved != held:
        raise CheckpointError(
            f"{path} holds an optimizer with parameter groups of sizes {saved}, but the prepared "
            f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__} has {held}. Build the optimizer "
            "as in the saved run. Nothing was loaded."
        )


def _check_model(model: nn.Module, path: Path, strict: bool) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the checkpoint has no weights for model {type(model).__name__}. Nothing "
            "was loaded."
        )
    try:
        plan = plan_load(model, [path], strict)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    for checkpoint in plan.checkpoints:
        checkpoint.close()


def _owned_optimizer_state(optimizer: Any, state: dict[str, Any], mapped: bool) -> dict[str, Any]:
    """``state`` with memory of its own: each saved tensor is copied into the optimizer's current tensor
    of the same shape, dtype and device (no new memory; the optimizer's steps update these in place
    too), and when ``state`` views a mapped file, every other tensor is cloned."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    saved_ids = [index for group in state["param_groups"] for index in group.get("params", ())]
    param_of = dict(zip(saved_ids, params))
    current = getattr(optimizer, "state", {})
    owned: set[int] = set()
    values_of: dict[Any, Any] = {}
    with torch.no_grad():
        for key, values in state["state"].items():
            held = current.get(param_of.get(key), {})
            if not isinstance(values, dict) or not isinstance(held, dict):
                values_of[key] = values
                continue
            values_of[key] = dict(values)
            for name, value in values.items():
                into = held.get(name)
                if (
                    isinstance(value, torch.Tensor)
                    and isinstance(into, torch.Tensor)
                    and into is not value
                    and (into.shape, into.dtype, into.device) == (value.shape, value.dtype, value.device)
                ):
                    values_of[key][name] = into.copy_(value)
                    owned.add(id(into))
    result = {**state, "state": values_of}
    if not mapped:
        return result
    return tree_map(
        lambda tensor: tensor.clone() if tensor.device.type == "cpu" and id(tensor) not in owned else tensor,
        result,
    )


@dataclass
class ReadState:
    """Everything one process read from a checkpoint, checked, not yet applied."""

    models: list[tuple[nn.Module, Path]] = field(default_factory=list)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizers: list[tuple[Any, Any, bool]] = field(default_factory=list)
    """(optimizer, saved state, whether the state views its mapped file)"""
    schedulers: list[tuple[Any, Any]] = field(default_factory=list)
    loaders: list[tuple[Any, Any]] = field(default_factory=list)
    scaler: tuple[Any, Any] | None = None
    customs: list[tuple[Any, Any]] = field(default_factory=list)
    rngs: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    gradients: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)

    def apply_scaler(self) -> None:
        if self.scaler is not None:
            scaler, state = self.scaler
            scaler.load_state_dict(state)
            self.scaler = None

    def apply(self) -> None:
        """Load what was read into the objects (RNG states excepted: :meth:`restore_rngs`)."""
        for model, path in self.models:
            load_checkpoint_in_model(model, path, strict=self.model_kwargs.get("strict", True))
        self.apply_scaler()
        for optimizer, state, mapped in self.optimizers:
            optimizer.load_state_dict(_owned_optimizer_state(optimizer, state, mapped))
        for scheduler, state in self.schedulers:
            scheduler.load_state_dict(state)
        for loader, state in self.loaders:
            loader.load_state_dict(state)
        for obj, state in self.customs:
            obj.load_state_dict(state)
        for model, saved in self.gradients:
            for name, parameter in model.named_parameters():
                grad = saved.get(name)
                parameter.grad = None if grad is None else grad.to(parameter.device, parameter.dtype)

    def restore_rngs(self) -> None:
        if self.rngs:
            rng.restore(self.rngs)


def read_state(
    folder: Path,
    models: list[nn.Module],
    optimizers: list[Any],
    schedulers: list[Any],
    dataloaders: list[Any],
    process_index: int,
    scaler: Any = None,
    map_location: Any = None,
    load_kwargs: dict[str, Any] | None = None,
    customs: list[Any] | None = None,
    trained_models: list[nn.Module] | None = None,
    **load_model_func_kwargs: Any,
) -> ReadState:
    """Read and check every file this process needs from ``folder``; change nothing.

    ``trained_models`` (default ``models``) get the pending gradients of a save made in the middle
    of an accumulation: every prepared model, including those a load hook took over.

    Raises:
        CheckpointError: a file is missing, truncated, corrupt or does not fit its object (the message
            names the file), or needs unpickling without the opt-in.
        TypeError: ``map_location`` is not ``None``, ``"cpu"`` or ``"on_device"``.
    """
    if map_location not in (None, "cpu", "on_device"):
        raise TypeError(f"map_location={map_location!r} must be None, 'cpu' or 'on_device'.")
    if map_location == "on_device":
        from hasten.state import PartialState

        map_location = PartialState().device
    location = map_location or "cpu"
    unknown = set(load_model_func_kwargs) - {"strict"}
    if unknown:
        raise TypeError(
            f"load_state: unknown keyword arguments {sorted(unknown)} for loading the models (only strict= "
            "and map_location= are taken, as well as what the engine's own loader takes under DeepSpeed)."
        )
    read = ReadState(model_kwargs=dict(load_model_func_kwargs))
    strict = bool(load_model_func_kwargs.get("strict", True))
    for index, model in enumerate(models):
        path = folder / files.model_file(index, safe_serialization=True)
        if not path.is_file() and (folder / files.model_file(index, safe_serialization=False)).is_file():
            path = folder / files.model_file(index, safe_serialization=False)
        _check_model(model, path, strict)
        read.models.append((model, path))
    for index, optimizer in enumerate(optimizers):
        path = folder / files.optimizer_file(index)
        mapped = files.mappable(path, load_kwargs)
        state = files.read(path, f"state of optimizer {index}", load_kwargs, location, mapped=mapped)
        _check_optimizer(state, optimizer, path)
        read.optimizers.append((optimizer, state, mapped))
    for index, scheduler in enumerate(schedulers):
        path = folder / files.scheduler_file(index)
        read.schedulers.append((scheduler, files.read(path, f"state of scheduler {index}", load_kwargs)))
    if scaler is not None:
        read.scaler = (scaler, files.read(folder / SCALER_NAME, "gradient scaler state", load_kwargs))
    rng_path = folder / files.rng_file(process_index)
    states = files.read(rng_path, f"RNG states of process {process_index}", load_kwargs)
    rng.check(states, rng_path)
    read.rngs = states
    read.step = states.get("step")
    read.loaders = _loader_states(folder, dataloaders, states.get(LOADERS_KEY), rng_path, load_kwargs)
    saved_gradients = states.get(GRADIENTS_KEY)
    if saved_gradients is not None:
        trained = models if trained_models is None else trained_models
        if not isinstance(saved_gradients, list) or len(saved_gradients) != len(trained):
            raise CheckpointError(
                f"{rng_path} holds the pending gradients of {len(saved_gradients)} models, but "
                f"{len(trained)} are prepared. Prepare the same models as the saved run. Nothing was loaded."
            )
        read.gradients = list(zip(trained, saved_gradients))
    if customs is not None:
        read.customs = _custom_states(folder, customs, load_kwargs)
    return read


def _loader_states(
    folder: Path, dataloaders: list[Any], saved: Any, rng_path: Path, load_kwargs: dict[str, Any] | None
) -> list[tuple[Any, Any]]:
    """Each loader's saved state: from the RNG file (hasten), or Accelerate's ``dl_state_dict*.bin``."""
    if saved is None:  # written by Accelerate: only torchdata loaders have a state file
        found = []
        for index, loader in enumerate(dataloaders):
            path = folder / files.loader_file(index)
            if getattr(loader, "use_stateful_dataloader", False) and path.is_file():
                found.append((loader, files.read(path, f"state of data loader {index}", load_kwargs)))
        return found
    if not isinstance(saved, list) or len(saved) != len(dataloaders):
        count = len(saved) if isinstance(saved, list) else type(saved).__name__
        raise CheckpointError(
            f"{rng_path} holds the states of {count} data loaders, but {len(dataloaders)} are prepared. "
            "Prepare the same data loaders, in the same order, as the saved run. Nothing was loaded."
        )
    return [(loader, state) for loader, state in zip(dataloaders, saved) if state is not None]


def _custom_states(
    folder: Path, customs: list[Any], load_kwargs: dict[str, Any] | None
) -> list[tuple[Any, Any]]:
    found = sorted(entry.name for entry in folder.iterdir() if _CUSTOM.fullmatch(entry.name))
    if len(found) != len(customs):
        raise CheckpointError(
            f"{folder} holds {len(found)} states of registered objects ({found}), but {len(customs)} objects "
            "are registered with register_for_checkpointing. Register the same objects, in the same order, "
            "as the saved run. Nothing was loaded."
        )
    return [
        (
            obj,
            files.read(folder / files.custom_file(index), f"state of registered object {index}", load_kwargs),
        )
        for index, obj in enumerate(customs)
    ]
