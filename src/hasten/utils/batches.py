"""What users do with batches of tensors: move, slice, concatenate, measure and describe them.

Every function here walks its input with the one traversal core of
:mod:`hasten.utils.tree`, so it accepts the same nested structures and rebuilds
the same container types.

>>> import torch
>>> batch = {"ids": torch.ones(4, 2), "labels": [torch.zeros(4)]}
>>> find_batch_size(batch), slice_tensors(batch, slice(0, 1))["ids"].shape
(4, torch.Size([1, 2]))
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hasten.utils.device import accelerator_count, accelerator_type, is_device_available
from hasten.utils.errors import TreeNestingError
from hasten.utils.tree import (
    MAX_NESTING,
    Unbuildable,
    key_text,
    nesting_error,
    rebuild_mapping,
    rebuild_sequence,
    tree_map,
)
from hasten.utils.typing import Device

_Tensor = torch.Tensor


@dataclass
class TensorInformation:
    """The shape and dtype of a tensor, enough to allocate one like it (see :func:`initialize_tensors`)."""

    shape: torch.Size
    dtype: torch.dtype


def is_tensor_information(tensor_info: Any) -> bool:
    """Whether ``tensor_info`` is a :class:`TensorInformation`."""
    return isinstance(tensor_info, TensorInformation)


_DEVICES: dict[Any, torch.device] = {}  # parsed device strings and indices, each checked to exist here
_USABLE: set[torch.device] = {torch.device("cpu"), torch.device("meta")}  # devices checked to exist here


def _as_device(device: Any) -> torch.device:
    if isinstance(device, torch.device):
        if device not in _USABLE:
            _check_usable(device, device)
        return device
    known = _DEVICES.get(device) if isinstance(device, str) else None
    if known is not None:
        return known
    if device == "npu":
        device = "npu:0"  # torch_npu cannot find its context from a bare "npu"
    if isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            parsed = torch.device(device)
        except RuntimeError as error:
            raise ValueError(
                f"send_to_device: device={device!r} cannot be used: {error} Pass a device this machine has, "
                "such as 'cpu'."
            ) from None
        if parsed not in _USABLE:
            _check_usable(parsed, device)
        if isinstance(device, str) and len(_DEVICES) < 64:
            _DEVICES[device] = parsed
        return parsed
    raise TypeError(
        f"send_to_device: device={device!r} must be a torch.device, a device string such as 'cpu' or "
        "'cuda:0', "
        "or an accelerator index."
    )


def _check_usable(device: torch.device, given: Any) -> None:
    """Refuse a device this machine lacks (torch would fail later with an assertion or a driver error)."""
    if not is_device_available(device):
        present = accelerator_type()
        count = accelerator_count(present)
        has = "only the CPU" if present == "cpu" else f"the CPU and {count} {present} device(s)"
        raise ValueError(
            f"send_to_device: device={given!r} is not available on this machine, which has {has}. "
            "Pass a device it has, such as 'cpu' (or `PartialState().device`)."
        )
    if len(_USABLE) < 64:
        _USABLE.add(device)


_CPU = torch.device("cpu")
NOT_FLAT = object()  # what move_flat_batch returns for a batch that is not flat


def batch_mover(device: Device, non_blocking: bool = False) -> Callable[[Any], Any]:
    """``send_to_device(batch, device, non_blocking)`` as a function of the batch, with ``device``
    resolved and checked once: prepared data loaders call it once per batch.

    For the CPU, a flat list, tuple or dict of CPU tensors (the usual batch) is only checked and
    put in a new container; anything else takes :func:`send_to_device`.
    """
    target = _as_device(device)
    if target != _CPU:

        def move(batch: Any) -> Any:
            moved = move_flat_batch(batch, target, non_blocking)
            return send_to_device(batch, target, non_blocking) if moved is NOT_FLAT else moved

        return move

    def move_to_cpu(batch: Any) -> Any:
        kind = type(batch)
        if kind is list or kind is tuple:
            values: Any = batch
        elif kind is dict:
            values = batch.values()
        else:
            return send_to_device(batch, target, non_blocking)
        for value in values:
            if type(value) is not _Tensor or not value.is_cpu:
                return send_to_device(batch, target, non_blocking)
        return batch if kind is tuple else kind(batch)

    return move_to_cpu


def move_flat_batch(batch: Any, target: torch.device, non_blocking: bool = False) -> Any:
    """A flat dict, list or tuple of tensors with every tensor on ``target`` (those already there
    are kept), or :data:`NOT_FLAT` for any other batch.

    The fast path of :func:`send_to_device`, for a device already resolved: prepared data loaders
    call it once per batch.
    """
    kind = type(batch)
    if kind is dict:  # the usual batch: a flat dict of tensors
        values: Any = batch.values()
    elif kind is list or kind is tuple:  # the other usual batch: a flat list or tuple of tensors
        values = batch
    else:
        return NOT_FLAT
    to_cpu = target == _CPU  # then `is_cpu` answers: far cheaper than building and comparing devices
    for value in values:
        if type(value) is not _Tensor:
            return NOT_FLAT
        if not (value.is_cpu if to_cpu else value.device == target):
            break
    else:  # all there (the usual case on the CPU): a new container, as the general path gives
        return batch if kind is tuple else kind(batch)
    for value in values:  # checked before anything moves: no copy is made and then thrown away
        if type(value) is not _Tensor:
            return NOT_FLAT
    moved = [
        value
        if (value.is_cpu if to_cpu else value.device == target)
        else value.to(target, non_blocking=non_blocking)
        for value in values
    ]
    if kind is dict:
        return dict(zip(batch, moved))
    return moved if kind is list else tuple(moved)


def _has_to(node: Any) -> bool:
    return hasattr(node, "to")


def send_to_device(
    tensor: Any, device: Device, non_blocking: bool = False, skip_keys: str | list[str] | None = None
) -> Any:
    """Move every tensor (and object with a ``.to()`` method) in a nested structure to ``device``.

    Tensors already on ``device`` are returned as they are (no copy). Values under the Mapping
    keys named in ``skip_keys`` (a key or a list of keys, at any depth) stay where they are.
    """
    target = _as_device(device)
    if skip_keys is None:
        moved = move_flat_batch(tensor, target, non_blocking)
        if moved is not NOT_FLAT:
            return moved
        skip: frozenset[Any] = frozenset()
    elif isinstance(skip_keys, str):
        skip = frozenset([skip_keys])
    else:
        try:
            skip = frozenset(skip_keys)
        except TypeError:
            raise TypeError(
                f"send_to_device: skip_keys={skip_keys!r} must be a key or a list of keys."
            ) from None

    def move(node: Any) -> Any:
        if type(node) is _Tensor:
            return node if node.device == target else node.to(target, non_blocking=non_blocking)
        try:
            return node.to(target, non_blocking=non_blocking)
        except TypeError:  # a .to() that takes no non_blocking
            return node.to(target)

    return tree_map(
        move,
        tensor,
        is_leaf=_has_to,
        skip_keys=skip,
        leaf_first=True,
        caller="send_to_device",
        argument="tensor",
    )


def get_data_structure(data: Any) -> Any:
    """``data`` with a :class:`TensorInformation` (shape and dtype) in place of each tensor."""
    return tree_map(
        lambda t: TensorInformation(shape=t.shape, dtype=t.dtype), data, caller="get_data_structure"
    )


def get_shape(data: Any) -> Any:
    """``data`` with each tensor's shape, as a list of ints, in its place."""
    return tree_map(lambda t: list(t.shape), data, caller="get_shape")


def initialize_tensors(data_structure: Any) -> Any:
    """Allocate an uninitialised tensor for every :class:`TensorInformation` in ``data_structure``."""
    return tree_map(
        lambda info: torch.empty(*info.shape, dtype=info.dtype),
        data_structure,
        is_leaf=is_tensor_information,
        tensors=False,
        caller="initialize_tensors",
        argument="data_structure",
    )


def _to_list(tensor: torch.Tensor) -> Any:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy, which tolist goes through, has no bfloat16
        tensor = tensor.float()
    return tensor.tolist()


def listify(data: Any) -> Any:
    """``data`` with each tensor turned into (nested lists of) Python numbers."""
    return tree_map(_to_list, data, caller="listify")


def slice_tensors(
    data: Any, tensor_slice: Any, process_index: int | None = None, num_processes: int | None = None
) -> Any:
    """``data`` with ``tensor[tensor_slice]`` in place of each tensor.

    ``process_index`` and ``num_processes`` are accepted for compatibility and not used.
    """
    return tree_map(operator.itemgetter(tensor_slice), data, caller="slice_tensors")  # t[tensor_slice]


def _concatenate_level(items: list[Any], dim: int, path: str) -> Any:
    first = items[0]
    if isinstance(first, _Tensor):
        try:
            return torch.cat(items, dim=dim)
        except TypeError:
            bad = next(i for i, item in enumerate(items) if not isinstance(item, _Tensor))
            raise TypeError(
                f"concatenate: data[{bad}]{path} is a {type(items[bad]).__qualname__}, but data[0]{path} is "
                "a tensor."
            ) from None
    if isinstance(first, (list, tuple)):
        for index, item in enumerate(items):
            if not isinstance(item, (list, tuple)) or len(item) != len(first):
                raise ValueError(
                    f"concatenate: data[{index}]{path} does not have the {len(first)} items of data[0]{path}."
                )
        parts = [
            _concatenate_level([item[i] for item in items], dim, f"{path}[{i}]") for i in range(len(first))
        ]
        return rebuild_sequence(first, parts)
    if isinstance(first, Mapping):
        merged = {}
        for key in first:
            try:
                column = [item[key] for item in items]
            except (KeyError, TypeError):
                raise ValueError(
                    f"concatenate: some item of data lacks the key {path}[{key!r}] of data[0]."
                ) from None
            merged[key] = _concatenate_level(column, dim, f"{path}[{key!r}]")
        return rebuild_mapping(first, merged)
    if len(items) == 1:
        return first
    raise TypeError(
        f"concatenate: can only concatenate tensors, but data[0]{path} is a {type(first).__qualname__}."
    )


def _concatenate_fast(first: Any, rest: Sequence[Any], cat: Callable[..., torch.Tensor]) -> Any:
    """:func:`concatenate` without keeping paths; any surprise raises and the careful walk takes over.

    Children are zipped across batches (dict keys must come in the same order), and tensor
    children are concatenated in the comprehension itself, without a call per leaf. ``cat`` is
    ``torch.cat`` itself for dim 0 (passing the dimension costs torch's argument parser about 10%
    of a small concatenation).
    """
    cls = type(first)
    if cls is _Tensor:
        return cat([first, *rest])
    sequence = cls is list or cls is tuple
    if not sequence and (cls is dict or isinstance(first, Mapping)):
        keys = list(first)
        for other in rest:
            if list(other) != keys:
                raise KeyError("keys differ")
        columns = zip(first.values(), *[other.values() for other in rest])
        merged = {
            key: cat(column) if type(column[0]) is _Tensor else _concatenate_fast(column[0], column[1:], cat)
            for key, column in zip(keys, columns)
        }
        return merged if cls is dict else rebuild_mapping(first, merged)
    if sequence or isinstance(first, (list, tuple)):
        for other in rest:
            if len(other) != len(first):
                raise ValueError("lengths differ")
        items = [
            cat(column) if type(column[0]) is _Tensor else _concatenate_fast(column[0], column[1:], cat)
            for column in zip(first, *rest)
        ]
        return items if cls is list else tuple(items) if cls is tuple else rebuild_sequence(first, items)
    if not rest:
        return first
    raise TypeError("not a tensor")


def concatenate(data: Sequence[Any], dim: int = 0) -> Any:
    """Concatenate a list of same-shaped structures leaf by leaf along ``dim``.

    ``data`` is a list of batches (each a tensor or nested structure of tensors) and the result
    has the structure of ``data[0]``. A single non-tensor batch is returned as it is.
    """
    if not isinstance(data, (list, tuple)) or len(data) == 0:
        raise ValueError(f"concatenate: data must be a non-empty list of batches, got {data!r:.80}.")
    try:
        return _concatenate_fast(
            data[0], data[1:], torch.cat if dim == 0 else functools.partial(torch.cat, dim=dim)
        )
    except Exception:
        pass
    try:
        return _concatenate_level(list(data), dim, "")
    except Unbuildable as error:
        raise TypeError(f"concatenate: a {error.problem}.") from None
    except RecursionError as error:
        raise nesting_error(data[0], "concatenate", "data[0]", error) from error


def find_batch_size(data: Any) -> int:
    """The size of the first dimension of the first tensor in ``data`` (first item, first key).

    Raises:
        ValueError: a container on the way is empty, or the tensor has no dimensions.
        TypeError: the first leaf is not a tensor.
    """
    node, path = data, ""
    for _ in range(MAX_NESTING * 10):
        if isinstance(node, (list, tuple, Mapping)):
            if len(node) == 0:
                raise ValueError(
                    f"find_batch_size: data{path} is an empty {type(node).__qualname__}, so it holds no "
                    "batch."
                )
            key = next(iter(node)) if isinstance(node, Mapping) else 0
            path += key_text(node, key)
            node = node[key]
            continue
        if not isinstance(node, _Tensor):
            raise TypeError(
                f"find_batch_size: data{path} is a {type(node).__qualname__}; can only find the batch size "
                "of tensors."
            )
        if node.ndim == 0:
            raise ValueError(f"find_batch_size: data{path} is a 0-d tensor, which has no batch dimension.")
        return int(node.shape[0])
    raise TreeNestingError(f"find_batch_size: data{path} is nested too deeply (does it contain itself?).")


def ignorant_find_batch_size(data: Any) -> int | None:
    """:func:`find_batch_size`, or ``None`` where it would raise."""
    try:
        return find_batch_size(data)
    except (ValueError, TypeError):
        return None


def _children(node: Any) -> Iterator[Any]:
    return iter(node.values()) if isinstance(node, Mapping) else iter(node)


def find_device(data: Any) -> torch.device | None:
    """The device of the first tensor found in ``data`` (depth first), ``None`` when it holds none."""
    if isinstance(data, _Tensor):
        return data.device
    if not isinstance(data, (list, tuple, Mapping)):
        return None
    seen = {id(data)}
    stack = [_children(data)]
    while stack:
        for node in stack[-1]:
            if isinstance(node, _Tensor):
                return node.device
            if isinstance(node, (list, tuple, Mapping)) and id(node) not in seen:
                seen.add(id(node))
                stack.append(_children(node))
                break
        else:
            stack.pop()
    return None


def _split_bounds(length: int, process_index: int, num_processes: int) -> tuple[int, int, int]:
    per_process, extras = divmod(length, num_processes)
    start = process_index * per_process + min(process_index, extras)
    end = start + per_process + (1 if process_index < extras else 0)
    return start, end, per_process + (1 if extras else 0)


def split_for_process(
    inputs: Any, process_index: int, num_processes: int, apply_padding: bool = False
) -> Any:
    """The share of ``inputs`` (a list, tuple, tensor, or dict of those) that process ``process_index`` of
    ``num_processes`` gets: contiguous, in rank order, sizes differing by at most one; with
    ``apply_padding``, shorter shares are padded with their last item (what
    ``PartialState.split_between_processes`` yields).

    Raises:
        ValueError: the values of a dict have different lengths.
        TypeError: ``inputs`` is of another type.

    >>> split_for_process([1, 2, 3, 4, 5], 1, 2), split_for_process([1, 2, 3], 1, 2, apply_padding=True)
    ([4, 5], [3, 3])
    """
    if isinstance(inputs, dict):
        lengths = {key: len(value) for key, value in inputs.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                "split_between_processes needs every value of the dict to have the same length; got "
                f"{lengths}."
            )
        return {
            key: split_for_process(value, process_index, num_processes, apply_padding)
            for key, value in inputs.items()
        }
    if not isinstance(inputs, (list, tuple, torch.Tensor)):
        raise TypeError(
            "split_between_processes takes a list, tuple, tensor or dict of those; got "
            f"{type(inputs).__name__}."
        )
    start, end, padded_length = _split_bounds(len(inputs), process_index, num_processes)
    missing = padded_length - (end - start)
    if not apply_padding or missing <= 0 or len(inputs) == 0:
        return inputs[start:end]
    last = end - 1 if end > start else len(inputs) - 1  # pad with this share's last item (or the very last)
    if isinstance(inputs, torch.Tensor):
        return torch.cat([inputs[start:end], inputs[last : last + 1].expand(missing, *inputs.shape[1:])])
    padded = list(inputs[start:end]) + [inputs[last]] * missing
    return padded if isinstance(inputs, list) else tuple(padded)
