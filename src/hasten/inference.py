"""Pipeline-parallel inference over ``torch.distributed.pipelining``: each process holds one stage
(a contiguous slice of the model's layers), and a batch flows through them in micro-batches.

``prepare_pippy(model, example_args=...)`` traces the model on one micro-batch of the example,
splits it into as many stages as there are processes (at balanced split points, or the ones
given), and replaces ``model.forward``: rank 0 takes the inputs, the last rank returns the
outputs (every rank with ``gather_output=True``). Works on CPU with gloo as on GPUs.

The stages exchange buffers of the traced shapes, so every call must have the example's shapes.
A smaller batch is padded to the example's and the output trimmed back; a larger batch or another
shape is an error raised on every rank (rank 0 shares what it received before the micro-batches
flow, so a bad input never leaves the other ranks waiting).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from hasten.state import PartialState
from hasten.utils.batches import ignorant_find_batch_size, send_to_device
from hasten.utils.device_map import infer_auto_device_map
from hasten.utils.modeling import calculate_maximum_sizes
from hasten.utils.operations import broadcast_object_list, copy_tensor_to_devices
from hasten.utils.tree import recursively_apply


def generate_device_map(
    model: torch.nn.Module,
    num_processes: int = 1,
    no_split_module_classes: list[str] | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """A device map giving each of ``num_processes`` an even share of ``model`` (with room for its
    largest layer), with every module listed (not merged), for choosing pipeline split points."""
    if num_processes == 1:
        return infer_auto_device_map(
            model, no_split_module_classes=no_split_module_classes, clean_result=False
        )
    if max_memory is None:
        total, (largest, _) = calculate_maximum_sizes(model)
        share = math.ceil((total / num_processes + largest) * 1.1)  # the planner keeps a largest layer free
        max_memory = dict.fromkeys(range(num_processes), share)
    return infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=no_split_module_classes, clean_result=False
    )


def find_pippy_batch_size(args: Any, kwargs: Any) -> int | None:
    """The batch size of the first tensor among ``args``, then ``kwargs`` (``None`` when there is none)."""
    for value in [*(args or ()), *(kwargs or {}).values()]:
        found = ignorant_find_batch_size(value)
        if found is not None:
            return found
    return None


def build_pipeline(
    model: torch.nn.Module, split_points: list[str], args: Any, kwargs: Any, num_chunks: int
) -> Any:
    """Trace ``model`` on the micro-batch ``args`` / ``kwargs``, cut it before each of ``split_points``,
    and return the GPipe schedule of this process's stage (``num_chunks`` micro-batches per step)."""
    from torch.distributed.pipelining import ScheduleGPipe, SplitPoint, pipeline

    state = PartialState()
    with warnings.catch_warnings():  # torch's tracer trips over its own deprecated pytree names
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*|copyreg")
        pipe = pipeline(
            model,
            mb_args=tuple(args),
            mb_kwargs=kwargs,
            split_spec=dict.fromkeys(split_points, SplitPoint.BEGINNING),
        )
        stage = pipe.build_stage(state.process_index, device=state.device)
    return ScheduleGPipe(stage, num_chunks)


def _shapes(args: Any, kwargs: Any) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    recursively_apply(lambda t: shapes.append(tuple(t.shape)), [list(args or ()), dict(kwargs or {})])
    return shapes


def _pad(data: Any, rows: int) -> Any:
    """Every tensor of ``data`` with its last row repeated up to ``rows`` rows."""
    return recursively_apply(lambda t: torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])]), data)


def _problem(
    args: Any, kwargs: Any, traced: list[tuple[int, ...]] | None, batch: int | None, rows: int | None
) -> str | None:
    """Why rank 0's inputs cannot go through the stages, or ``None`` when they can (``traced`` and
    ``rows``: the example's shapes and batch size, when known)."""
    if batch is None:
        return "found no tensor in the inputs to take the batch size from."
    if traced is None or rows is None:
        return None
    if batch > rows:
        return f"got a batch of {batch} rows; the pipeline was traced for {rows}. Split it, or prepare again."
    shapes = _shapes(args, kwargs)
    if [shape[1:] for shape in shapes] != [shape[1:] for shape in traced]:
        return (
            f"got inputs of shapes {shapes}; the pipeline was traced for {traced} (only batches may shrink)."
        )
    return None


def pippy_forward(
    forward: Callable[..., Any], num_chunks: int, gather_output: bool, *args: Any, **kwargs: Any
) -> Any:
    """One pipelined forward: rank 0 feeds the inputs to ``forward`` (the schedule's ``step``), the last
    rank returns the outputs (every rank with ``gather_output``); see the module docstring."""
    state = PartialState()
    if state.num_processes == 1:
        return forward(*args, **kwargs)
    traced, rows = getattr(getattr(forward, "__self__", None), "_hasten_traced", (None, None))
    verdict: list[Any] = [None, None]
    if state.is_main_process:
        batch = find_pippy_batch_size(args, kwargs)
        verdict = [_problem(args, kwargs, traced, batch, rows), batch]
    broadcast_object_list(verdict)
    problem, batch = verdict
    if problem is not None:
        raise ValueError(f"prepare_pippy: rank 0 {problem}")
    output = None
    if state.is_main_process:
        if rows is not None and batch < rows:
            args, kwargs = _pad(args, rows), _pad(kwargs, rows)
        forward(*args, **kwargs)
    elif state.is_last_process:
        output = forward()[:batch]
    else:
        forward()
    if gather_output:
        output = copy_tensor_to_devices(output if state.is_last_process else None)
    return output


def prepare_pippy(
    model: torch.nn.Module,
    split_points: str | list[str] | None = "auto",
    no_split_module_classes: list[str] | None = None,
    example_args: tuple[Any, ...] | None = (),
    example_kwargs: dict[str, Any] | None = None,
    num_chunks: int | None = None,
    gather_output: bool | None = False,
) -> torch.nn.Module:
    """Prepare ``model`` for pipeline-parallel inference over all processes; returns it, changed.

    Args:
        model: the model, whole, on every process.
        split_points: ``"auto"`` (balanced by size), or the names of the modules that start stages
            2, 3, ... (one fewer than the number of processes).
        no_split_module_classes: class names of layers never cut inside (with ``"auto"``).
        example_args / example_kwargs: one batch of the inputs every call will have (same shapes; a
            call may have fewer rows). Its batch size must divide by ``num_chunks``.
        num_chunks: micro-batches per batch (default: the number of processes).
        gather_output: give the output to every process (otherwise only the last has it).

    Raises:
        ValueError: split points of the wrong number or not in the model, no example tensor, or an
            example batch that does not divide into ``num_chunks``.
    """
    state = PartialState()
    example_args = send_to_device(tuple(example_args or ()), "cpu")
    example_kwargs = send_to_device(dict(example_kwargs or {}), "cpu")
    chunks = num_chunks if num_chunks is not None else state.num_processes
    rows = find_pippy_batch_size(example_args, example_kwargs)
    if rows is None or chunks < 1 or rows % chunks:
        raise ValueError(
            f"prepare_pippy: the example batch has {rows} rows, which must be a multiple of "
            f"num_chunks={chunks} "
            "(one micro-batch each); pass example_args (or example_kwargs) holding a batch of that size."
        )
    if split_points == "auto":
        device_map = generate_device_map(model, state.num_processes, no_split_module_classes)
        split_points = [
            next(name for name, device in device_map.items() if device == i)
            for i in range(1, state.num_processes)
        ]
    points = [split_points] if isinstance(split_points, str) else list(split_points or [])
    names = {name for name, _ in model.named_modules()}
    if len(points) != state.num_processes - 1 or not set(points) <= names:
        raise ValueError(
            f"prepare_pippy: split_points={points} must name {state.num_processes - 1} modules of the model "
            "(one per "
            f"stage after the first), e.g. {sorted(names - {''})[:5]}, or be 'auto'."
        )
    schedule = None
    step = model.forward  # one process: the single stage is the model itself
    if state.num_processes > 1:
        micro_args = recursively_apply(lambda t: t[: rows // chunks], example_args)
        micro_kwargs = recursively_apply(lambda t: t[: rows // chunks], example_kwargs)
        schedule = build_pipeline(model, points, micro_args, micro_kwargs, chunks)
        schedule._hasten_traced = (_shapes(example_args, example_kwargs), rows)
        step = schedule.step

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return pippy_forward(step, chunks, bool(gather_output), *args, **kwargs)

    forward.__wrapped__ = model.forward  # type: ignore[attr-defined]
    vars(model).update(
        _original_forward=model.forward,  # what extract_model_from_parallel restores
        _original_call=model.__call__,
        pippy_stage=schedule,
        hf_split_points=points,
        forward=forward,
    )
    return model
