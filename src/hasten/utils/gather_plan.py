"""A checked ``gather`` of a signature seen before, worked out once and replayed.

An evaluation loop gathers the same dtypes and shapes every step. What only depends on that
signature is built on first sight and cached: the envelope's header and signature words, the bytes
every rank's envelope starts with when the calls agree, the packed offsets, and typed views of a
send and a receive buffer where each leaf's bytes go and come from. A call then copies each leaf in,
exchanges the envelope, compares one run of bytes to learn that every rank passed the same shapes,
and copies each gathered leaf out: the outputs are fresh tensors, never views of the reused
buffers. When the calls disagree the envelope is decoded as usual and the same error as before is
raised on every rank.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hasten.utils.exchange import (
    ENVELOPE_BYTES,
    Exchanged,
    Op,
    all_gather_into,
    call_of,
    envelope_head,
    packed_offsets,
)

Layout = Sequence[tuple[int, int, Any, torch.dtype, tuple[int, ...]]]
"""Where each leaf sits in a packed row: start and end byte, numpy dtype (``None`` when numpy lacks
it), dtype and the gathered shape (every rank's rows along dim 0)."""

_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def layout_of(offsets: Sequence[int], leaves: Sequence[torch.Tensor], world: int) -> Layout:
    """The :data:`Layout` of ``leaves`` packed at ``offsets``, gathered from ``world`` ranks."""
    return [
        (
            offset,
            offset + leaf.numel() * leaf.element_size(),
            _NUMPY_DTYPES.get(leaf.dtype),
            leaf.dtype,
            (world * leaf.shape[0], *leaf.shape[1:]),
        )
        for offset, leaf in zip(offsets, leaves)
    ]


def unpack_rows(rows: torch.Tensor | np.ndarray, layout: Layout, base: int = 0) -> list[torch.Tensor]:
    """Each leaf's rows from every rank, concatenated along dim 0 (``rows`` is world x bytes, uint8:
    a tensor, or a numpy array of host memory; the leaves start ``base`` bytes into each row).

    Host bytes are copied out with numpy (one cheap call per leaf); torch views them as dtypes
    numpy lacks (bfloat16, float8, ...).
    """
    host = rows if isinstance(rows, np.ndarray) else rows.numpy() if rows.device.type == "cpu" else None
    out = []
    for start, end, numpy_dtype, dtype, shape in layout:
        if host is None:
            out.append(rows[:, base + start : base + end].view(dtype).reshape(shape))  # type: ignore[call-overload]
            continue
        chunk = np.ascontiguousarray(host[:, base + start : base + end])
        if numpy_dtype is not None:
            out.append(torch.from_numpy(chunk.view(numpy_dtype).reshape(shape)))
        else:
            out.append(torch.from_numpy(chunk).view(dtype).reshape(shape))
    return out


def gatherable(leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``leaves`` as a gather packs them: detached, contiguous, 0-d as 1-d."""
    out = []
    for leaf in leaves:
        leaf = leaf.detach() if leaf.requires_grad else leaf
        if leaf.ndim == 0:
            leaf = leaf.reshape(1)
        out.append(leaf if leaf.is_contiguous() else leaf.contiguous())
    return out


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


class GatherPlan:
    """One gather signature (the ready leaves' dtypes and shapes, on ``world`` ranks with host buffers).

    Attributes:
        offsets, total, layout: where the leaves go in a packed buffer of ``total`` bytes.
        words: this call's signature words (for :class:`Exchanged` when the calls disagree).
        inline: whether the leaves travel inside the envelope.
    """

    def __init__(self, ready: Sequence[torch.Tensor], world: int) -> None:
        self.world = world
        self.offsets, self.total = packed_offsets(ready)
        self.layout = layout_of(self.offsets, ready, world)
        call = call_of(Op.GATHER, ready)
        self.words = call.encode()
        template, start, size, fits = envelope_head(call.op, self.words, self.total)
        self.inline = size >= 0
        self._checkable = fits  # a signature too long for the envelope: no byte check, decode it
        self._expected = template[:start].tobytes() * world
        self._send = torch.from_numpy(template)
        self._received = torch.empty(world * ENVELOPE_BYTES, dtype=torch.uint8)
        self._heads = self._received.numpy().reshape(world, ENVELOPE_BYTES)[:, :start]
        self._lock = threading.Lock()  # the buffers serve one call at a time
        self._inputs: list[torch.Tensor] = []
        self._outputs: list[tuple[Any, tuple[int, ...], torch.dtype | None]] = []
        if self.inline:
            for (begin, end, numpy_dtype, dtype, shape), leaf in zip(self.layout, ready):
                where = start + begin
                self._inputs.append(self._send[where : start + end].view(dtype).view(leaf.shape))
                itemsize = leaf.element_size()
                rows = torch.as_strided(
                    self._received.view(dtype),
                    (world, *leaf.shape),
                    (ENVELOPE_BYTES // itemsize, *_contiguous_strides(leaf.shape)),
                    where // itemsize,
                )
                if numpy_dtype is None:  # numpy lacks the dtype: torch copies the rows out
                    self._outputs.append((rows, shape, dtype))
                    continue
                host = np.lib.stride_tricks.as_strided(
                    self._received.numpy()[where:].view(numpy_dtype),
                    rows.shape,
                    tuple(stride * itemsize for stride in rows.stride()),
                )
                self._outputs.append((host, shape, None))

    def exchange(self, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor] | Exchanged | None:
        """Exchange the envelope for ``leaves`` (this plan's signature, any strides, 0-d allowed).

        Returns the gathered leaves when every rank sent this call inline, ``None`` when every rank
        sent it and the leaves are too big to travel inline, and the :class:`Exchanged` to check
        and decode otherwise. A second thread arriving while the buffers are in use gets fresh ones.
        """
        if not self._lock.acquire(blocking=False):
            return GatherPlan(gatherable(leaves), self.world).exchange(leaves)
        try:
            for target, leaf in zip(self._inputs, leaves):
                target.copy_(leaf.detach() if leaf.requires_grad else leaf)
            all_gather_into(self._received, self._send)
            if not (self._checkable and self._heads.tobytes() == self._expected):
                return Exchanged(self._received.clone(), self.words, self.world, torch.device("cpu"))
            if not self.inline:
                return None
            # The rows are strided (one envelope apart), so making them contiguous copies them into
            # fresh memory (numpy's is the cheaper call); only on one rank could they already be
            # contiguous, a view of the reused buffer, so that case is copied again.
            out = [
                torch.from_numpy(np.ascontiguousarray(rows).reshape(shape))
                if torch_dtype is None
                else rows.contiguous().view(shape)
                for rows, shape, torch_dtype in self._outputs
            ]
            return out if self.world > 1 else [tensor.clone() for tensor in out]
        finally:
            self._lock.release()


_PLANS: dict[tuple[Any, ...], GatherPlan] = {}
_MAX_PLANS = 16  # each holds (world + 1) envelopes of buffers


def gather_plan(leaves: Sequence[torch.Tensor], world: int) -> GatherPlan:
    """The cached :class:`GatherPlan` for ``leaves``' dtypes and shapes (built on first sight)."""
    key = (world, *((leaf.dtype, leaf.shape) for leaf in leaves))
    plan = _PLANS.get(key)
    if plan is None:
        plan = GatherPlan(gatherable(leaves), world)
        if len(_PLANS) >= _MAX_PLANS:  # many signatures (ragged batches): start over
            _PLANS.clear()
        _PLANS[key] = plan
    return plan
