"""Collectives over nested structures of tensors: gather, broadcast, reduce, pad, and their object forms.

Each takes the nested lists / tuples / dicts / Mappings that :mod:`hasten.utils.tree`
handles and returns the same structure. On a single process each returns its
input's values (``reduce`` a copy) without needing a process group.

Across processes they use as few round-trips as their meaning allows. Every
leaf travels in one packed buffer whatever its dtype (``reduce``: one buffer per
dtype), and ``pad_across_processes`` learns every size of a whole structure in
one exchange. ``gather`` always checks first that the ranks passed the same
shapes, in an envelope of fixed size that also carries small payloads (see
:mod:`hasten.utils.exchange`), so a shape mismatch is a clear
:class:`DistributedOperationException` on every rank instead of a hang or an
abort inside the backend. With ``ACCELERATE_DEBUG_MODE`` set, ``broadcast``,
``reduce`` and the object collectives run the same check first.
"""

from __future__ import annotations

import functools
import io
import operator
import pickle
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, get_args

import torch
import torch.distributed as dist

from hasten.state import PartialState
from hasten.utils.errors import (
    CannotPadNestedTensorWarning,
    ConfigurationError,
    DistributedOperationException,
    RendezvousTimeoutError,
)
from hasten.utils.exchange import (
    ENVELOPE_BYTES,
    Call,
    Op,
    all_gather_into,
    as_bytes,
    as_sendable,
    call_of,
    check_calls,
    comm_device,
    dtype_of,
    exchange,
    exchange_envelopes,
    pack_into,
    packed_offsets,
    view_leaf,
)
from hasten.utils.gather_plan import gather_plan, gatherable, layout_of, unpack_rows
from hasten.utils.reexport import lazy_reexports
from hasten.utils.tree import leaf_paths, tree_flatten

Reduction = Literal["mean", "sum", "max", "none"]
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)

__all__ = [
    "CannotPadNestedTensorWarning",
    "DistributedOperationException",
    "broadcast",
    "broadcast_object_list",
    "copy_tensor_to_devices",
    "gather",
    "gather_object",
    "pad_across_processes",
    "pad_input_tensors",
    "reduce",
]


F = TypeVar("F", bound=Callable[..., Any])


def _reports_timeouts(function: F) -> F:
    """Turn the backend's timeout inside a collective into a :class:`RendezvousTimeoutError` naming it."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except RuntimeError as error:
            text = str(error)
            if "timed out" not in text.lower() and "timeout" not in text.lower():
                raise
            state = PartialState()
            raise RendezvousTimeoutError(
                f"{function.__name__} on rank {state.process_index} of {state.num_processes}: the other "
                "ranks did "
                f"not all take part before the process-group timeout ({text.splitlines()[0]}). A rank that "
                "crashed, or that skipped or reordered its collectives, is the usual cause; with "
                "ACCELERATE_DEBUG_MODE=1 mismatched calls raise instead of waiting."
            ) from error

    return wrapper  # type: ignore[return-value]


def _distributed() -> PartialState | None:
    state = PartialState()
    return state if state.use_distributed else None


def _paths(data: Any, argument: str) -> Callable[[], list[str]]:
    return lambda: leaf_paths(data, argument)


def _check_devices(
    state: PartialState, leaves: Sequence[torch.Tensor], data: Any, caller: str, argument: str
) -> None:
    """Debug mode: every leaf must be on this process's device type."""
    wanted = state.device.type
    for index, leaf in enumerate(leaves):
        if leaf.device.type != wanted:
            raise DistributedOperationException(
                f"{caller}: {leaf_paths(data, argument)[index]} is on {leaf.device.type!r}, but this process "
                f"computes on {wanted!r}. Move it there first, e.g. with send_to_device(..., "
                f"{str(state.device)!r})."
            )


def _debug_check(
    state: PartialState,
    op: Op,
    leaves: Sequence[torch.Tensor],
    data: Any,
    argument: str,
    arguments: Sequence[int] = (),
    names: Sequence[str] = (),
) -> None:
    """In debug mode, make sure every rank is in the same call with compatible tensors before
    communicating."""
    if not state.debug:
        return
    _check_devices(state, leaves, data, op.label, argument)
    replies = exchange(call_of(op, leaves, arguments))
    check_calls(replies, _paths(data, argument), names)


# --- gather -------------------------------------------------------------------------------------


@_reports_timeouts
def gather(tensor: Any) -> Any:
    """Gather every tensor of a nested structure from all processes, concatenated along dim 0 in rank order.

    0-d tensors become 1-d. Every rank must pass the same structure with the same dtypes and
    shapes; pad ragged tensors first with :func:`pad_across_processes`.

    Raises:
        TypeError: the structure holds something other than tensors (the message names its path).
        DistributedOperationException: the ranks passed different shapes or structures (every
            rank raises, naming what each rank passed).
    """
    state = _distributed()
    if state is None:
        return tensor
    kind = type(tensor)
    rebuild: Callable[[list[Any]], Any]
    if kind is torch.Tensor:  # the common shapes skip the tree walk
        leaves, rebuild = [tensor], operator.itemgetter(0)
    elif (kind is tuple or kind is list) and all(type(leaf) is torch.Tensor for leaf in tensor):
        leaves, rebuild = list(tensor), kind
    else:
        leaves, spec = tree_flatten(tensor, strict=True, caller="gather", argument="tensor")
        rebuild = spec.unflatten
    if state.debug:
        _check_devices(state, leaves, tensor, "gather", "tensor")
    world = state.num_processes
    device = comm_device(state)
    if device.type == "cpu":  # host buffers: the signature's cached plan
        plan = gather_plan(leaves, world)
        found = plan.exchange(leaves)
        if isinstance(found, list):  # every rank passed the same shapes and the data came along
            return rebuild(found)
        layout, offsets, total = plan.layout, plan.offsets, plan.total
    else:
        ready = gatherable(leaves)
        offsets, total = packed_offsets(ready)
        layout = layout_of(offsets, ready, world)
        found = exchange_envelopes(call_of(Op.GATHER, ready), (ready, offsets, total))
        block = found.block()
        if block is not None:
            return rebuild(unpack_rows(block, layout))
    if found is not None:  # the calls disagree, or the signature needs decoding: check it
        check_calls(found.replies(), _paths(tensor, "tensor"))  # raises unless the shapes agree
    ready = gatherable(leaves)
    if len(ready) == 1:  # one tensor: straight into its output, no packing
        (leaf,) = ready
        out = torch.empty((world * leaf.shape[0], *leaf.shape[1:]), dtype=leaf.dtype, device=leaf.device)
        all_gather_into(as_sendable(out), as_sendable(leaf))
        return rebuild([out])
    send = torch.empty(total, dtype=torch.uint8, device=device)
    pack_into(send, offsets, ready)
    received = torch.empty(world * total, dtype=torch.uint8, device=device)
    all_gather_into(received, send)
    return rebuild(unpack_rows(received.view(world, total), layout))


# --- objects ------------------------------------------------------------------------------------


def _pickled(obj: Any) -> torch.Tensor:
    """``obj`` pickled, as a uint8 tensor sharing the pickle's memory (no copy)."""
    stream = io.BytesIO()
    pickle.dump(obj, stream, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.frombuffer(stream.getbuffer(), dtype=torch.uint8)


def _unpickled(data: torch.Tensor) -> Any:
    host = data if data.device.type == "cpu" else data.cpu()
    return pickle.loads(host.numpy().data)  # a memoryview of the received bytes: no copy


@_reports_timeouts
def gather_object(object: Any) -> Any:
    """Gather a picklable object from every process into one list, in rank order.

    A list or tuple from each rank is flattened into the result (``[a, b]`` on rank 0 and
    ``[c]`` on rank 1 give ``[a, b, c]``); any other object is one item. On a single process
    ``object`` is returned as it is.
    """
    state = _distributed()
    if state is None:
        return object
    payload = _pickled(object)
    replies = exchange(Call(int(Op.GATHER_OBJECT), (), ()), payload)
    check_calls(replies, list)
    if all(reply.payload is not None for reply in replies):
        parts = [_unpickled(reply.payload) for reply in replies if reply.payload is not None]
    else:
        parts = _gather_big_objects(state, payload, [reply.payload_size for reply in replies])
    gathered: list[Any] = []
    for part in parts:
        if isinstance(part, (list, tuple)):
            gathered.extend(part)
        else:
            gathered.append(part)
    return gathered


def _gather_big_objects(state: PartialState, payload: torch.Tensor, sizes: Sequence[int]) -> list[Any]:
    device = comm_device(state)
    longest = max(sizes)
    if payload.numel() == longest and payload.device == device:
        send = payload
    else:
        send = torch.zeros(longest, dtype=torch.uint8, device=device)
        send[: payload.numel()].copy_(payload)
    received = torch.empty(state.num_processes * longest, dtype=torch.uint8, device=device)
    all_gather_into(received, send)
    rows = received.view(state.num_processes, longest)
    return [_unpickled(rows[rank, :size]) for rank, size in enumerate(sizes)]


def _check_source(state: PartialState, from_process: Any, caller: str) -> int:
    if (
        isinstance(from_process, bool)
        or not isinstance(from_process, int)
        or not 0 <= from_process < state.num_processes
    ):
        raise ConfigurationError(
            f"{caller}: from_process={from_process!r} must be the rank of a process, an int from 0 to "
            f"{state.num_processes - 1}."
        )
    return from_process


@_reports_timeouts
def broadcast_object_list(object_list: list[Any], from_process: int = 0) -> list[Any]:
    """Replace the items of ``object_list`` on every process with those of process ``from_process``.

    The list is changed in place and returned. Objects travel pickled, in one broadcast when
    they are small.
    """
    state = _distributed()
    if state is None:
        return object_list
    source = _check_source(state, from_process, "broadcast_object_list")
    if not isinstance(object_list, list):
        raise TypeError(
            f"broadcast_object_list: object_list must be a list (it is filled in place), got "
            f"{type(object_list).__qualname__}."
        )
    if state.debug:
        replies = exchange(Call(int(Op.BROADCAST_OBJECT_LIST), (source,), ()))
        check_calls(replies, list, ("from_process",))
    device = comm_device(state)
    sending = state.process_index == source
    payload = _pickled(list(object_list)) if sending else None
    envelope = torch.zeros(ENVELOPE_BYTES, dtype=torch.uint8, device=device)
    inline = payload is not None and 8 + payload.numel() <= ENVELOPE_BYTES
    if payload is not None:
        envelope[:8].view(torch.int64)[0] = payload.numel()
        if inline:
            envelope[8 : 8 + payload.numel()].copy_(payload)
    dist.broadcast(envelope, src=source)
    size = int(envelope[:8].view(torch.int64).item())
    if 8 + size <= ENVELOPE_BYTES:
        data = envelope[8 : 8 + size]
    else:  # too big for the envelope: a second broadcast of exactly its size
        data = (
            payload.to(device) if payload is not None else torch.empty(size, dtype=torch.uint8, device=device)
        )
        dist.broadcast(data, src=source)
    if not sending:
        object_list[:] = _unpickled(data)
    return object_list


@_reports_timeouts
def copy_tensor_to_devices(tensor: torch.Tensor | None = None) -> torch.Tensor:
    """Share a tensor that exists on one process with all of them; the others pass ``None``.

    Unlike :func:`broadcast`, the receivers need not know its shape or dtype. A small tensor
    travels in the one exchange that tells the others who has it; a larger one follows in a
    broadcast from that process.

    Raises:
        ValueError: no process passed a tensor (on a single process: ``tensor`` is ``None``).
        TypeError: ``tensor`` is neither a tensor nor ``None``.
        DistributedOperationException: not exactly one process passed a tensor.
    """
    if tensor is not None and not isinstance(tensor, torch.Tensor):
        raise TypeError(
            "copy_tensor_to_devices: tensor must be a torch.Tensor on one process and None on the others, "
            "got "
            f"{type(tensor).__qualname__}."
        )
    state = _distributed()
    if state is None:
        if tensor is None:
            raise ValueError(
                "copy_tensor_to_devices: tensor is None on the only process; pass the tensor to share."
            )
        return tensor.to(PartialState().device)
    leaves = [] if tensor is None else [tensor.detach().contiguous()]
    payload = None
    if leaves:
        offsets, total = packed_offsets(leaves)
        payload = torch.empty(total, dtype=torch.uint8, device=comm_device(state))
        pack_into(payload, offsets, leaves)
    replies = exchange(call_of(Op.COPY_TENSOR_TO_DEVICES, leaves), payload)
    check_calls(replies, list, compare="none")
    holders = [rank for rank, reply in enumerate(replies) if reply.call.leaves]
    if len(holders) != 1:
        raise DistributedOperationException(
            f"copy_tensor_to_devices: exactly one process must pass a tensor (the others None), but "
            f"{'none did' if not holders else f'ranks {holders} did'}."
        )
    source = holders[0]
    code, shape = replies[source].call.leaves[0]
    received = replies[source].payload
    if received is not None:
        out = view_leaf(received, 0, dtype_of(code), shape).clone()
    else:
        out = leaves[0] if leaves else torch.empty(shape, dtype=dtype_of(code), device=comm_device(state))
        dist.broadcast(as_bytes(out), src=source)
    return out.to(state.device)


# --- broadcast and reduce -----------------------------------------------------------------------


@_reports_timeouts
def broadcast(tensor: Any, from_process: int = 0) -> Any:
    """Copy every tensor of a nested structure from process ``from_process`` into the same tensors elsewhere.

    The receiving tensors (same dtypes and shapes on every rank) are filled in place; the
    structure is returned. All leaves travel in one packed broadcast.

    Raises:
        TypeError: the structure holds something other than tensors (the message names its path).
        ConfigurationError: ``from_process`` is not a rank.
    """
    state = _distributed()
    if state is None:
        return tensor
    source = _check_source(state, from_process, "broadcast")
    leaves, spec = tree_flatten(tensor, strict=True, caller="broadcast", argument="tensor")
    _debug_check(state, Op.BROADCAST, leaves, tensor, "tensor", (source,), ("from_process",))
    with torch.no_grad():
        if len(leaves) == 1 and leaves[0].is_contiguous():
            dist.broadcast(as_bytes(leaves[0]), src=source)
            return spec.unflatten(leaves)
        offsets, total = packed_offsets(leaves)
        device = comm_device(state)
        buffer = torch.empty(total, dtype=torch.uint8, device=device)
        sending = state.process_index == source
        if sending:
            pack_into(buffer, offsets, leaves)
        dist.broadcast(buffer, src=source)
        if not sending:
            for offset, leaf in zip(offsets, leaves):
                leaf.copy_(view_leaf(buffer, offset, leaf.dtype, leaf.shape))
    return spec.unflatten(leaves)


# Dtypes gloo cannot reduce, and the wider dtype that gives the same result (sums wrap the same way).
_REDUCE_AS: dict[torch.dtype, torch.dtype] = {
    dtype: wider
    for name, wider in (
        ("int16", torch.int32),
        ("uint16", torch.int32),
        ("uint32", torch.int64),
        ("float8_e4m3fn", torch.float32),
        ("float8_e5m2", torch.float32),
    )
    if isinstance(dtype := getattr(torch, name, None), torch.dtype)
}


def _check_reduction(reduction: Any) -> str:
    if reduction not in _REDUCTIONS:
        raise ConfigurationError(
            f"reduce: reduction={reduction!r} is not a reduction; use one of {list(_REDUCTIONS)} "
            "('none' sums without dividing, as in Accelerate)."
        )
    return str(reduction)


@_reports_timeouts
def reduce(tensor: Any, reduction: Reduction = "mean", scale: float = 1.0) -> Any:
    """Reduce every tensor of a nested structure across processes: mean, sum or max, then times ``scale``.

    Returns new tensors (the inputs are left as they are); ``"none"`` sums without dividing, as
    Accelerate does. Leaves of one dtype are reduced together in one buffer.

    Raises:
        ConfigurationError: ``reduction`` is not one of the allowed values.
        TypeError: ``"mean"`` of integer tensors across processes, or a leaf is not a tensor.
    """
    mode = _check_reduction(reduction)
    leaves, spec = tree_flatten(tensor, strict=True, caller="reduce", argument="tensor")
    state = _distributed()
    if state is None:
        return spec.unflatten([leaf.clone() if scale == 1 else leaf * scale for leaf in leaves])
    for index, leaf in enumerate(leaves):
        if mode == "mean" and not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                "reduce: reduction='mean' needs floating-point tensors, but "
                f"{leaf_paths(tensor, 'tensor')[index]} "
                f"is {leaf.dtype}. Use reduction='sum' (and divide by num_processes), or convert it to "
                "float first."
            )
    _debug_check(state, Op.REDUCE, leaves, tensor, "tensor", (_REDUCTIONS.index(mode),), ("reduction",))
    op = dist.ReduceOp.MAX if mode == "max" else dist.ReduceOp.SUM
    results: list[torch.Tensor | None] = [None] * len(leaves)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, leaf in enumerate(leaves):
        groups.setdefault((leaf.dtype, leaf.device), []).append(index)
    with torch.no_grad():
        for (dtype, _), members in groups.items():
            if len(members) == 1:
                buffer = leaves[members[0]].detach().clone(memory_format=torch.contiguous_format).reshape(-1)
            else:
                buffer = torch.cat([leaves[i].detach().reshape(-1) for i in members])
            wider = _REDUCE_AS.get(dtype)
            if wider is not None:  # the backend cannot add these: reduce in a wider dtype, then come back
                buffer = buffer.to(wider)
            dist.all_reduce(buffer, op)
            if mode == "mean":
                buffer /= state.num_processes
            if scale != 1:
                buffer *= scale
            if wider is not None:
                buffer = buffer.to(dtype)
            start = 0
            for i in members:
                count = leaves[i].numel()
                results[i] = buffer[start : start + count].view(leaves[i].shape)
                start += count
    return spec.unflatten(results)


# --- padding ------------------------------------------------------------------------------------


def _pad_to(leaf: torch.Tensor, dim: int, size: int, pad_index: Any, pad_first: bool) -> torch.Tensor:
    if leaf.shape[dim] == size:
        return leaf
    shape = list(leaf.shape)
    shape[dim] = size
    padded = leaf.new_full(shape, pad_index)
    start = size - leaf.shape[dim] if pad_first else 0
    padded.narrow(dim, start, leaf.shape[dim]).copy_(leaf)
    return padded


@_reports_timeouts
def pad_across_processes(tensor: Any, dim: int = 0, pad_index: int = 0, pad_first: bool = False) -> Any:
    """Pad every tensor of a nested structure along ``dim`` to the largest size any process has there.

    Afterwards the tensors can be gathered. All sizes of the whole structure are learned in one
    exchange. Tensors with fewer than ``dim`` dimensions are returned as they are, and nested
    tensors too (with a :class:`CannotPadNestedTensorWarning`).

    Raises:
        TypeError: the structure holds something other than tensors (the message names its path).
        DistributedOperationException: the ranks passed different structures or numbers of dimensions.
    """
    leaves, spec = tree_flatten(tensor, strict=True, caller="pad_across_processes", argument="tensor")
    eligible = []
    for index, leaf in enumerate(leaves):
        if getattr(leaf, "is_nested", False):
            warnings.warn(
                "pad_across_processes cannot pad a nested tensor without more information; it is returned "
                "as it is.",
                CannotPadNestedTensorWarning,
                stacklevel=2,
            )
        elif -leaf.ndim <= dim < leaf.ndim:
            eligible.append(index)
    state = _distributed()
    if state is None:
        return tensor
    if state.debug:
        _check_devices(state, leaves, tensor, "pad_across_processes", "tensor")
    chosen = [leaves[i] for i in eligible]
    replies = exchange(call_of(Op.PAD_ACROSS_PROCESSES, chosen, (dim, int(pad_first))))
    all_paths = _paths(tensor, "tensor")
    check_calls(replies, lambda: [all_paths()[i] for i in eligible], ("dim", "pad_first"), compare="ndim")
    padded = list(leaves)
    for position, index in enumerate(eligible):
        leaf = leaves[index]
        axis = dim % leaf.ndim
        largest = max(reply.call.leaves[position][1][axis] for reply in replies)
        padded[index] = _pad_to(leaf, axis, largest, pad_index, pad_first)
    return spec.unflatten(padded)


def pad_input_tensors(tensor: Any, batch_size: int, num_processes: int, dim: int = 0) -> Any:
    """Pad every tensor along ``dim`` with zeros up to the next multiple of ``num_processes``.

    ``batch_size`` is the size the batch has along ``dim`` (usually ``find_batch_size(tensor)``);
    a batch smaller than ``num_processes`` is padded up to ``num_processes``, so every process
    gets at least one row. Tensors already at least that large are returned as they are.

    Raises:
        ConfigurationError: ``num_processes`` is not a positive int or ``batch_size`` is negative.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigurationError(
            f"pad_input_tensors: num_processes={num_processes!r} must be a positive int."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ConfigurationError(f"pad_input_tensors: batch_size={batch_size!r} must be an int >= 0.")
    target = -(-batch_size // num_processes) * num_processes

    def pad(leaf: torch.Tensor) -> torch.Tensor:
        if leaf.ndim == 0 or leaf.shape[dim] >= target:
            return leaf
        return _pad_to(leaf, dim % leaf.ndim, target, 0, False)

    leaves, spec = tree_flatten(tensor, strict=True, caller="pad_input_tensors", argument="tensor")
    return spec.unflatten([pad(leaf) for leaf in leaves])


# Accelerate's `accelerate.utils.operations` also holds the tree operations and checks around
# collectives; hasten keeps them in their own modules.
__getattr__, __dir__ = lazy_reexports(
    __name__,
    globals(),
    {
        "hasten.utils.batches": "concatenate find_batch_size find_device get_data_structure get_shape "
        "ignorant_find_batch_size initialize_tensors is_tensor_information listify send_to_device "
        "slice_tensors",
        "hasten.utils.operation_checks": "GatheredParameters chained_operation gather_tensor_shape "
        "verify_operation",
        "hasten.utils.precision": "ConvertOutputsToFp32 convert_outputs_to_fp32 convert_to_fp32",
        "hasten.utils.tree": "honor_type is_namedtuple is_torch_tensor is_torch_xpu_tensor recursively_apply",
    },
)
