"""hasten.utils.exchange without a process group: signatures, byte packing and the cross-rank checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hasten.utils.errors import DistributedOperationException
from hasten.utils.exchange import (
    Call,
    Op,
    Reply,
    align,
    call_of,
    check_calls,
    dtype_code,
    pack_into,
    packed_offsets,
    view_leaf,
)

shapes = st.lists(st.integers(0, 5), max_size=4).map(tuple)
calls = st.builds(
    Call,
    st.sampled_from([int(op) for op in Op]),
    st.lists(st.integers(-3, 9), max_size=3).map(tuple),
    st.lists(st.tuples(st.integers(-1, 12), shapes), max_size=6).map(tuple),
)


@given(calls)
def test_a_call_survives_encoding(call: Call) -> None:
    assert Call.decode(call.op, call.encode()) == call


def test_dtype_codes_are_distinct_and_unknown_is_minus_one() -> None:
    codes = [dtype_code(d) for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool)]
    assert len(set(codes)) == 5 and min(codes) >= 0
    assert dtype_code(torch.quint8) == -1
    assert Call(1, (), ((-1, (2,)),)).describe_leaf(0) == "other[2]"


def test_mixed_dtypes_pack_at_aligned_offsets_and_view_back() -> None:
    leaves = [
        torch.arange(3, dtype=torch.float16),
        torch.tensor([True, False, True]),
        torch.arange(6, dtype=torch.float64).view(2, 3),
        torch.empty(0, 2, dtype=torch.int32),
        torch.tensor([1 + 2j], dtype=torch.complex128),
        torch.tensor([7], dtype=torch.bfloat16),
    ]
    offsets, total = packed_offsets(leaves)
    assert (
        all(offset % 16 == 0 for offset in offsets) and total == align(total) and total >= 6 + 3 + 48 + 16 + 2
    )
    buffer = torch.zeros(total, dtype=torch.uint8)
    pack_into(buffer, offsets, leaves)
    for offset, leaf in zip(offsets, leaves):
        back = view_leaf(buffer, offset, leaf.dtype, leaf.shape)
        assert back.dtype == leaf.dtype and torch.equal(back, leaf)
        assert back.data_ptr() == buffer.data_ptr() + offset or leaf.numel() == 0  # a view, not a copy


def _replies(*calls: Call) -> list[Reply]:
    return [Reply(call, -1, None) for call in calls]


def test_check_calls_accepts_matching_calls() -> None:
    leaves = [torch.ones(2, 3), torch.ones(1, dtype=torch.int64)]
    call = call_of(Op.GATHER, leaves)
    check_calls(_replies(call, call, call), lambda: ["t[0]", "t[1]"])


def test_check_calls_names_each_rank_on_every_kind_of_mismatch() -> None:
    one = call_of(Op.REDUCE, [torch.ones(2)], (0,))
    with pytest.raises(
        DistributedOperationException,
        match=r"rank 0 reduce\(\), rank 1 gather\(\), rank 2 op 99\. Every rank must",
    ):
        check_calls(_replies(one, call_of(Op.GATHER, [torch.ones(2)]), Call(99, (), ())), lambda: ["x"])
    with pytest.raises(
        DistributedOperationException, match=r"rank 0 \(reduction=0\), rank 1 \(reduction=2\)"
    ):
        check_calls(_replies(one, call_of(Op.REDUCE, [torch.ones(2)], (2,))), lambda: ["x"], ("reduction",))
    many = call_of(Op.REDUCE, [torch.ones(1)] * 10, (0,))
    with pytest.raises(DistributedOperationException, match=r"rank 1: 10 tensors \[.*\] \.\.\."):
        check_calls(_replies(one, many), lambda: ["x"])
    wide = [torch.ones(i + 1) for i in range(10)]
    shifted = [torch.ones(i + 2) for i in range(10)]
    with pytest.raises(DistributedOperationException, match=r"and 2 more\nreduce needs the same dtype"):
        check_calls(
            _replies(call_of(Op.REDUCE, wide), call_of(Op.REDUCE, shifted)),
            lambda: [f"t[{i}]" for i in range(10)],
        )


def test_check_calls_for_padding_compares_only_the_number_of_dimensions() -> None:
    first = call_of(Op.PAD_ACROSS_PROCESSES, [torch.ones(2, 3)], (0, 0))
    check_calls(
        _replies(first, call_of(Op.PAD_ACROSS_PROCESSES, [torch.ones(5, 3)], (0, 0))),
        lambda: ["t"],
        compare="ndim",
    )
    with pytest.raises(
        DistributedOperationException, match="different numbers of dimensions:\n  - t: rank 0"
    ):
        check_calls(
            _replies(first, call_of(Op.PAD_ACROSS_PROCESSES, [torch.ones(5)], (0, 0))),
            lambda: ["t"],
            compare="ndim",
        )
