"""How the collectives talk: one fixed-size envelope per rank, byte packing, and the cross-rank checks.

Every rank that calls a checked collective first all-gathers one *envelope* of
:data:`ENVELOPE_BYTES` bytes. It holds the operation's code, its arguments that
must agree (``dim``, ``from_process``, ...), a signature of every tensor leaf
(dtype and shape) and, when it fits, the payload itself. Because the envelope
has the same size on every rank, this first exchange can never itself be a
mismatched collective: whatever the ranks passed, each learns what every other
rank passed and all of them raise the same :class:`DistributedOperationException`
when the calls do not fit together, instead of hanging or aborting inside the
backend. Small payloads (most metric gathers, most pickled objects) travel in
the envelope, so the check costs no extra round-trip for them.

Leaves of any dtypes are packed as raw bytes into one buffer, each at a 16-byte
aligned offset so the bytes can be viewed back as their dtype without copying.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from hasten.state import PartialState
from hasten.utils.errors import DistributedOperationException

ENVELOPE_BYTES = 16384
"""Bytes each rank contributes to the first exchange (the same on every rank, by construction)."""

_HEADER_WORDS = 3  # operation, signature length, payload bytes (-1: none, -2: too big to inline)
_ALIGN = 16


class Op(enum.IntEnum):
    """The collectives, by the code that identifies them in the envelope."""

    GATHER = 1
    GATHER_OBJECT = 2
    BROADCAST = 3
    BROADCAST_OBJECT_LIST = 4
    REDUCE = 5
    PAD_ACROSS_PROCESSES = 6
    COPY_TENSOR_TO_DEVICES = 7

    @property
    def label(self) -> str:
        return self.name.lower()


_DTYPES: list[torch.dtype] = [
    getattr(torch, name)
    for name in (
        "float32",
        "float64",
        "float16",
        "bfloat16",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "bool",
        "complex64",
        "complex128",
        "complex32",
        "uint16",
        "uint32",
        "uint64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


def dtype_code(dtype: torch.dtype) -> int:
    """A number for ``dtype`` that every rank agrees on (-1 for a dtype outside the list)."""
    return _DTYPE_CODE.get(dtype, -1)


def dtype_of(code: int) -> torch.dtype:
    """The dtype :func:`dtype_code` gave ``code`` (``ValueError`` for -1, a dtype outside the list)."""
    if not 0 <= code < len(_DTYPES):
        raise ValueError(f"No dtype has the code {code}; the tensor's dtype is not one hasten can send.")
    return _DTYPES[code]


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).removeprefix("torch.") if 0 <= code < len(_DTYPES) else "other"


def align(nbytes: int) -> int:
    """``nbytes`` rounded up to the packing alignment."""
    return -(-nbytes // _ALIGN) * _ALIGN


# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns).
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor) -> None:
    """All-gather ``tensor`` from every rank into ``output`` (rank after rank along dim 0)."""
    _ALL_GATHER_SINGLE(output, tensor)


def comm_device(state: PartialState) -> torch.device:
    """Where the buffers of a collective live: the CPU for gloo, the process's device otherwise."""
    return torch.device("cpu") if state.backend == "gloo" else state.device


# --- what each rank passed ----------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """What one rank passed to a collective: the operation, its agreed arguments and its leaves."""

    op: int
    arguments: tuple[int, ...]
    leaves: tuple[tuple[int, tuple[int, ...]], ...]  # (dtype code, shape) per tensor

    def encode(self) -> list[int]:
        """The signature words: argument count, arguments, leaf count, then dtype, ndim, shape per leaf."""
        words = [len(self.arguments), *self.arguments, len(self.leaves)]
        for code, shape in self.leaves:
            words += [code, len(shape), *shape]
        return words

    @classmethod
    def decode(cls, op: int, words: Sequence[int]) -> Call:
        """Read back what :meth:`encode` wrote."""
        n_args = words[0]
        arguments = tuple(words[1 : 1 + n_args])
        position = 1 + n_args
        n_leaves = words[position]
        position += 1
        leaves = []
        for _ in range(n_leaves):
            code, ndim = words[position], words[position + 1]
            leaves.append((code, tuple(words[position + 2 : position + 2 + ndim])))
            position += 2 + ndim
        return cls(op, arguments, tuple(leaves))

    def describe_leaf(self, index: int) -> str:
        """``float32[2, 3]`` for leaf ``index``."""
        code, shape = self.leaves[index]
        return f"{_dtype_name(code)}{list(shape)}"


def call_of(op: Op, leaves: Sequence[torch.Tensor], arguments: Sequence[int] = ()) -> Call:
    """This rank's :class:`Call` for ``op`` on ``leaves``."""
    return Call(int(op), tuple(arguments), tuple((dtype_code(t.dtype), tuple(t.shape)) for t in leaves))


# --- byte packing -------------------------------------------------------------------------------


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a 1-D uint8 view, so any dtype can travel (gloo has no int16, ...)."""
    return tensor.reshape(-1).view(torch.uint8)


_NATIVE = frozenset(
    (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int8, torch.uint8)
)
"""Dtypes every backend sends as they are (gloo moves large float tensors a little faster than bytes)."""


def as_sendable(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as a 1-D view a collective can send: itself for a native dtype, else its bytes."""
    return tensor.reshape(-1) if tensor.dtype in _NATIVE else tensor.reshape(-1).view(torch.uint8)


def packed_offsets(leaves: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Aligned byte offsets of ``leaves`` in a packed buffer, and the buffer's (aligned) size."""
    offsets, end = [], 0
    for leaf in leaves:
        offsets.append(end)
        end = align(end + leaf.numel() * leaf.element_size())
    return offsets, end


def pack_into(buffer: torch.Tensor, offsets: Sequence[int], leaves: Sequence[torch.Tensor]) -> None:
    """Copy each leaf's bytes into the uint8 ``buffer`` at its offset."""
    for offset, leaf in zip(offsets, leaves):
        size = leaf.numel() * leaf.element_size()
        if size:
            buffer[offset : offset + size].view(leaf.dtype).copy_(leaf.reshape(-1))


def view_leaf(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The leaf of ``dtype`` and ``shape`` packed in the uint8 ``buffer`` at ``offset`` (a view, no copy)."""
    count = 1
    for size in shape:
        count *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    return buffer[offset : offset + count * itemsize].view(dtype).view(tuple(shape))


# --- the envelope -------------------------------------------------------------------------------


@dataclass
class Reply:
    """What one rank sent in the envelope exchange."""

    call: Call
    payload_size: int  # bytes; -1 when the rank sent none
    payload: torch.Tensor | None  # the inlined bytes (a view into the received buffer), None when too big


def _host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a host numpy array (a view on the CPU, a copy otherwise)."""
    flat = tensor if tensor.ndim == 1 else tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return (flat if flat.device.type == "cpu" else flat.cpu()).numpy()


Packed = tuple[Sequence[torch.Tensor], Sequence[int], int]
"""Leaves to pack into the envelope: the tensors, their byte offsets and the packed size."""


def envelope_head(op: int, words: list[int], size: int) -> tuple[np.ndarray, int, int, bool]:
    """An envelope with its header and signature written and the payload bytes zero; the payload's
    start, the size word (``-2 - size`` when ``size`` bytes do not fit inline) and whether the
    signature fit (else it travels in a second exchange, see :class:`Exchanged`)."""
    header_words = _HEADER_WORDS + len(words)
    fits_words = header_words <= ENVELOPE_BYTES // 8
    start = align(8 * header_words)
    if size >= 0 and not (fits_words and start + size <= ENVELOPE_BYTES):
        size = -2 - size  # too big to travel inline; the size still tells the others how big
    buffer = np.zeros(ENVELOPE_BYTES, dtype=np.uint8)
    head = [op, len(words), size] + (words if fits_words else [])
    buffer[: 8 * len(head)].view(np.int64)[:] = head
    return buffer, start, size, fits_words


def _pack_host(
    buffer: np.ndarray, start: int, offsets: Sequence[int], leaves: Sequence[torch.Tensor]
) -> None:
    """Copy each leaf's bytes into the host ``buffer`` at ``start`` + its offset."""
    for offset, leaf in zip(offsets, leaves):
        if leaf.numel():
            data = _host_bytes(leaf)
            buffer[start + offset : start + offset + data.size] = data


def _write_envelope(op: int, words: list[int], payload: torch.Tensor | Packed | None) -> torch.Tensor:
    """The envelope, built in host memory with numpy (a few cheap array operations instead of many
    small tensor operations: this runs before every checked collective)."""
    size = -1 if payload is None else payload.numel() if isinstance(payload, torch.Tensor) else payload[2]
    buffer, start, size, _ = envelope_head(op, words, size)
    if isinstance(payload, torch.Tensor) and size >= 0:
        buffer[start : start + size] = _host_bytes(payload)
    elif payload is not None and size >= 0:
        leaves, offsets, _ = payload
        _pack_host(buffer, start, offsets, leaves)
    return torch.from_numpy(buffer)


class Exchanged:
    """Every rank's envelope after one exchange, decoded only as far as the caller needs.

    When every rank sent the same call (the common case) :attr:`uniform` holds and the payloads
    can be read as one block; :meth:`replies` decodes each rank's :class:`Reply` for the checks.
    """

    def __init__(
        self, received: torch.Tensor, own_words: list[int], world: int, device: torch.device
    ) -> None:
        self.rows = received.view(world, ENVELOPE_BYTES)
        self.host: np.ndarray | None = self.rows.numpy() if self.rows.device.type == "cpu" else None
        words = (self.host if self.host is not None else self.rows.cpu().numpy()).view(np.int64)
        self.heads: list[list[int]] = words[:, :_HEADER_WORDS].tolist()
        lengths = [length for _, length, _ in self.heads]
        if all(_HEADER_WORDS + length <= ENVELOPE_BYTES // 8 for length in lengths):
            self.signatures: list[list[int]] = [
                words[rank, _HEADER_WORDS : _HEADER_WORDS + length].tolist()
                for rank, length in enumerate(lengths)
            ]
        else:  # some signature did not fit (thousands of leaves): exchange them all, padded to the longest
            mine = torch.zeros(max(lengths), dtype=torch.int64)
            mine[: len(own_words)] = torch.tensor(own_words, dtype=torch.int64)
            gathered = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
            all_gather_into(gathered, mine.to(device))
            table = gathered.view(world, -1).cpu()
            self.signatures = [table[rank, :length].tolist() for rank, length in enumerate(lengths)]
        first_head, first_signature = self.heads[0], self.signatures[0]
        self.uniform = all(head == first_head for head in self.heads) and all(
            signature == first_signature for signature in self.signatures
        )

    def _start(self, rank: int) -> int:
        return align(8 * (_HEADER_WORDS + self.heads[rank][1]))

    def block(self) -> np.ndarray | torch.Tensor | None:
        """Every rank's inlined payload as one world x bytes block (a numpy view on the CPU), when the
        exchange is uniform and the payloads travelled inline; ``None`` otherwise."""
        size = self.heads[0][2]
        if not self.uniform or size < 0:
            return None
        start = self._start(0)
        return (self.host if self.host is not None else self.rows)[:, start : start + size]

    def replies(self) -> list[Reply]:
        """Each rank's :class:`Reply`, in rank order."""
        replies = []
        for rank, (op, _, size) in enumerate(self.heads):
            payload = None
            if size >= 0:
                start = self._start(rank)
                payload = (
                    torch.from_numpy(self.host[rank, start : start + size])
                    if self.host is not None
                    else self.rows[rank, start : start + size]
                )
            replies.append(
                Reply(Call.decode(op, self.signatures[rank]), size if size >= -1 else -2 - size, payload)
            )
        return replies


def exchange_envelopes(call: Call, payload: torch.Tensor | Packed | None = None) -> Exchanged:
    """All-gather each rank's envelope (``call`` and, if it fits, ``payload``).

    Args:
        call: what this rank is doing.
        payload: a 1-D uint8 tensor to send along when it fits in the envelope, or leaves to pack
            straight into it (``(leaves, offsets, size)`` from :func:`packed_offsets`).
    """
    state = PartialState()
    device = comm_device(state)
    words = call.encode()
    envelope = _write_envelope(call.op, words, payload)
    if device.type != "cpu":
        envelope = envelope.to(device)
    received = torch.empty(state.num_processes * ENVELOPE_BYTES, dtype=torch.uint8, device=device)
    all_gather_into(received, envelope)
    return Exchanged(received, words, state.num_processes, device)


def exchange(call: Call, payload: torch.Tensor | Packed | None = None) -> list[Reply]:
    """:func:`exchange_envelopes`, decoded into every rank's :class:`Reply`."""
    return exchange_envelopes(call, payload).replies()


# --- checking that the calls fit together -------------------------------------------------------

_HINTS = {
    Op.GATHER: "gather needs the same dtype and shape on every rank; pad ragged tensors first with "
    "pad_across_processes(tensor, dim=...), which makes them the same size.",
    Op.BROADCAST: "broadcast needs receiving tensors of the sender's dtype and shape on every rank.",
    Op.REDUCE: "reduce needs the same dtype and shape on every rank.",
    Op.PAD_ACROSS_PROCESSES: (
        "pad_across_processes needs the same structure on every rank, with the same number "
        "of dimensions per tensor; only the size along `dim` may differ."
    ),
}


def _per_rank(values: Sequence[str]) -> str:
    return ", ".join(f"rank {rank} {value}" for rank, value in enumerate(values))


def _leaf_lines(calls: Sequence[Call], paths: Sequence[str], differs: Any, limit: int = 8) -> list[str]:
    lines = []
    for index, path in enumerate(paths):
        if differs(index):
            lines.append(f"  - {path}: " + _per_rank([call.describe_leaf(index) for call in calls]))
    if len(lines) > limit:
        lines = [*lines[:limit], f"  - ... and {len(lines) - limit} more"]
    return lines


def check_calls(
    replies: Sequence[Reply],
    paths: Callable[[], Sequence[str]],
    argument_names: Sequence[str] = (),
    compare: Literal["shape", "ndim", "none"] = "shape",
) -> None:
    """Raise the same :class:`DistributedOperationException` on every rank when the calls do not fit.

    Args:
        replies: every rank's envelope, from :func:`exchange`.
        paths: gives how this rank's leaves are named (``tensor['logits']``), in leaf order; called
            only to write a message.
        argument_names: the names of the call's agreed arguments, for the message.
        compare: what must match leaf by leaf: dtype and ``"shape"``, only the number of
            dimensions (``"ndim"``), or nothing, not even the number of leaves (``"none"``).
    """
    calls = [reply.call for reply in replies]
    first = calls[0]
    if any(call.op != first.op for call in calls):
        names = [
            f"{Op(call.op).label}()" if call.op in Op._value2member_map_ else f"op {call.op}"
            for call in calls
        ]
        raise DistributedOperationException(
            f"The ranks called different collectives at the same time: {_per_rank(names)}. Every rank must "
            "call "
            "the same operations in the same order."
        )
    op = Op(first.op)
    if any(call.arguments != first.arguments for call in calls):
        shown = [", ".join(f"{n}={v}" for n, v in zip(argument_names, call.arguments)) for call in calls]
        raise DistributedOperationException(
            f"{op.label} was called with different arguments: {_per_rank([f'({s})' for s in shown])}. "
            "Pass the same values on every rank."
        )
    if compare == "none":
        return
    if any(len(call.leaves) != len(first.leaves) for call in calls):
        listing = "\n".join(
            f"  - rank {rank}: {len(call.leaves)} tensors "
            + str([call.describe_leaf(i) for i in range(min(len(call.leaves), 8))])
            + (" ..." if len(call.leaves) > 8 else "")
            for rank, call in enumerate(calls)
        )
        raise DistributedOperationException(
            f"{op.label}: the ranks passed different numbers of tensors:\n{listing}\n"
            f"{_HINTS.get(op, '')}".rstrip()
        )

    def differs(index: int) -> bool:
        leaf = first.leaves[index]
        if compare == "shape":
            return any(call.leaves[index] != leaf for call in calls)
        return any(len(call.leaves[index][1]) != len(leaf[1]) for call in calls)

    lines = _leaf_lines(calls, paths(), differs) if any(map(differs, range(len(first.leaves)))) else []
    if lines:
        what = "dtypes or shapes" if compare == "shape" else "numbers of dimensions"
        raise DistributedOperationException(
            f"{op.label}: the ranks passed tensors of different {what}:\n"
            + "\n".join(lines)
            + f"\n{_HINTS[op]}"
        )
