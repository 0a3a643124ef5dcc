"""Decorators and helpers around the collectives of ``utils/operations.py``, under Accelerate's names.

hasten's collectives check their inputs themselves (see ``utils/exchange.py``); these are for
user-written collectives that want the same protection, and for code written against
Accelerate's helpers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from hasten.state import AcceleratorState, PartialState
from hasten.utils.batches import find_device, get_shape
from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.errors import DistributedOperationException

F = TypeVar("F", bound=Callable[..., Any])


def verify_operation(function: F) -> F:
    """Decorator for a collective whose first argument (or ``tensor=``) is a nested structure of tensors:
    under ``ACCELERATE_DEBUG_MODE`` (``PartialState().debug``), first check that it is on this process's
    device type and has the same shapes on every rank.

    Raises:
        DistributedOperationException: a tensor is on another device type, or the ranks' shapes differ
            (the message lists each rank's).
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = PartialState()
        if state.distributed_type == DistributedType.NO or not state.debug:
            return function(*args, **kwargs)
        from hasten.utils.operations import gather_object

        operation = f"{function.__module__}.{function.__name__}"
        tensor = kwargs["tensor"] if "tensor" in kwargs else args[0]
        device = find_device(tensor)
        if device is not None and device.type != state.device.type:
            raise DistributedOperationException(
                f"One or more of the tensors passed to {operation} were not on the {device.type} while the "
                f"`Accelerator` is configured for {state.device.type}. Please move it to the "
                f"{state.device.type} before calling {operation}."
            )
        shapes = gather_object([get_shape(tensor)])
        if shapes.count(shapes[0]) != len(shapes):
            per_rank = "\n  - ".join(f"Process {rank}: {shape}" for rank, shape in enumerate(shapes))
            raise DistributedOperationException(
                "Cannot apply desired operation due to shape mismatches. All shapes across devices must be "
                f"valid.\n\nOperation: `{operation}`\nInput shapes:\n  - {per_rank}"
            )
        return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def chained_operation(function: F) -> F:
    """Decorator: a :class:`DistributedOperationException` raised inside ``function`` is re-raised naming
    ``function``, chained to the original (which says what went wrong)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except DistributedOperationException as error:
            operation = f"{function.__module__}.{function.__name__}"
            raise DistributedOperationException(
                f"Error found while calling `{operation}`. Please see the earlier error for more details."
            ) from error

    return wrapper  # type: ignore[return-value]


def gather_tensor_shape(tensor: torch.Tensor | None) -> tuple[torch.Tensor, torch.dtype]:
    """The shape (as a 1-D int64 tensor) and dtype of a tensor that exists on one process only; the
    others pass ``None``.

    Raises:
        DistributedOperationException: not exactly one process passed a tensor.
    """
    from hasten.utils.operations import gather_object

    mine = None if tensor is None else (list(tensor.shape), tensor.dtype)
    found = [info for info in gather_object([mine]) if info is not None]
    if len(found) != 1:
        where = "on the only process" if PartialState().num_processes == 1 else f"on {len(found)} processes"
        raise DistributedOperationException(
            f"gather_tensor_shape: exactly one process must pass a tensor (the others None); it was passed "
            f"{where}."
        )
    shape, dtype = found[0]
    return torch.tensor(shape, dtype=torch.int64), dtype


@contextlib.contextmanager
def GatheredParameters(
    params: Any, modifier_rank: int | None = None, fwd_module: Any = None, enabled: bool = True
) -> Iterator[None]:
    """Within the block, DeepSpeed ZeRO-3 partitioned ``params`` are whole on every rank (changes made on
    ``modifier_rank`` are kept); without ZeRO-3 initialisation it does nothing."""
    state = AcceleratorState()
    plugin = state.deepspeed_plugin
    if state.distributed_type != DistributedType.DEEPSPEED or (
        plugin is not None and not plugin.is_zero3_init_enabled()
    ):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(
        params, modifier_rank=modifier_rank, fwd_module=fwd_module, enabled=enabled
    ):
        yield
