"""hasten's tree operations and collectives against Accelerate's, on a corpus of structures.

Single-process functions are compared in this process; collectives run both libraries
side by side on the same 2 gloo ranks. Where hasten deliberately differs (docs/design.md),
the corpus stays on the ground both define the same way.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch

from hasten import utils as ours
from hasten.state import PartialState
from hasten.utils import operations as ours_ops
from hasten.utils import precision as ours_precision
from hasten.utils.tree import tree_leaves
from tests.ranks import RankPool

accelerate_ops = pytest.importorskip("accelerate.utils.operations")

Pair = namedtuple("Pair", ["first", "second"])


def corpus() -> list[Any]:
    """Structures both libraries handle (Accelerate cannot rebuild a defaultdict)."""
    return [
        torch.arange(6.0).view(2, 3),
        [torch.ones(2, 2), torch.zeros(2, 1, dtype=torch.int64)],
        (torch.ones(3, dtype=torch.float16),),
        {"input_ids": torch.arange(8).view(2, 4), "attention_mask": torch.ones(2, 4, dtype=torch.bool)},
        {
            "a": [
                torch.ones(2),
                (torch.full((2, 2), 2.0, dtype=torch.bfloat16), Pair(torch.ones(2), torch.zeros(2))),
            ]
        },
        OrderedDict(z=torch.ones(2, 3), a=[torch.zeros(2)]),
        {"x": torch.ones(4), "meta": {"name": "batch", "n": 3, "none": None}},
        Pair({"p": torch.ones(2)}, [torch.tensor([1.5, 2.5])]),
    ]


def assert_same(theirs: Any, mine: Any) -> None:
    assert type(mine) is type(theirs)
    if isinstance(theirs, torch.Tensor):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and mine.device == theirs.device
        assert theirs.device.type == "meta" or torch.equal(mine, theirs)
    elif isinstance(theirs, dict):
        assert list(mine) == list(theirs)
        for key in theirs:
            assert_same(theirs[key], mine[key])
    elif isinstance(theirs, (list, tuple)):
        assert len(mine) == len(theirs)
        for a, b in zip(theirs, mine):
            assert_same(a, b)
    else:
        assert mine == theirs


CASES = list(enumerate(corpus()))


@pytest.mark.parametrize(("index", "data"), CASES, ids=[str(i) for i, _ in CASES])
def test_tree_operations_agree(index: int, data: Any) -> None:
    assert_same(
        accelerate_ops.recursively_apply(lambda t: t * 2, data), ours.recursively_apply(lambda t: t * 2, data)
    )
    assert_same(accelerate_ops.send_to_device(data, "cpu"), ours.send_to_device(data, "cpu"))
    assert accelerate_ops.listify(data) == ours.listify(data)
    assert_same(accelerate_ops.convert_to_fp32(data), ours_precision.convert_to_fp32(data))
    assert accelerate_ops.get_shape(data) == ours.get_shape(data)
    assert accelerate_ops.find_device(data) == ours.find_device(data)
    assert accelerate_ops.ignorant_find_batch_size(data) == ours.ignorant_find_batch_size(data)
    assert_same(accelerate_ops.slice_tensors(data, slice(0, 1)), ours.slice_tensors(data, slice(0, 1)))
    structure_theirs = accelerate_ops.get_data_structure(data)
    structure_ours = ours.get_data_structure(data)
    assert ours.get_shape(ours.initialize_tensors(structure_ours)) == accelerate_ops.get_shape(
        accelerate_ops.initialize_tensors(structure_theirs)
    )
    if "meta" not in str(data):  # strings cannot be concatenated by either library
        assert_same(accelerate_ops.concatenate([data, data]), ours.concatenate([data, data]))


@pytest.mark.parametrize(("index", "data"), CASES, ids=[str(i) for i, _ in CASES])
def test_skip_keys_and_strictness_agree(index: int, data: Any) -> None:
    assert_same(
        accelerate_ops.send_to_device(data, "meta", skip_keys=["a", "x"]),
        ours.send_to_device(data, "meta", skip_keys=["a", "x"]),
    )
    theirs_raises = ours_raises = False
    try:
        accelerate_ops.recursively_apply(lambda t: t, data, error_on_other_type=True)
    except TypeError:
        theirs_raises = True
    try:
        ours.recursively_apply(lambda t: t, data, error_on_other_type=True)
    except TypeError:
        ours_raises = True
    assert theirs_raises == ours_raises


@pytest.mark.parametrize(("batch_size", "num_processes"), [(3, 4), (5, 4), (1, 2), (7, 8)])
def test_pad_input_tensors_agrees_where_accelerate_pads_to_a_multiple(
    batch_size: int, num_processes: int
) -> None:
    data = {"x": torch.arange(batch_size * 2).view(batch_size, 2) + 1, "y": [torch.ones(batch_size)]}
    assert_same(
        accelerate_ops.pad_input_tensors(data, batch_size, num_processes),
        ours_ops.pad_input_tensors(data, batch_size, num_processes),
    )


def test_small_helpers_agree() -> None:
    for obj in ([1], (1,), Pair(1, 2)):
        items = [5, 6][: len(obj)]
        assert accelerate_ops.honor_type(obj, iter(items)) == ours.honor_type(obj, iter(items))
        assert accelerate_ops.is_namedtuple(obj) == ours.is_namedtuple(obj)


# --- collectives on 2 ranks, both libraries in the same processes --------------------------------


def _both(name: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    return getattr(accelerate_ops, name)(*args, **kwargs), getattr(ours_ops, name)(*args, **kwargs)


def _on_rank_collectives_agree() -> list[str]:
    from accelerate.state import PartialState as AcceleratePartialState

    rank = PartialState().process_index
    AcceleratePartialState(cpu=True)
    checked = []
    for index, data in enumerate(corpus()):
        tensors = ours.recursively_apply(lambda t: t + rank, data)
        if any(not isinstance(leaf, torch.Tensor) for leaf in tree_leaves(tensors, is_leaf=lambda _: True)):
            continue  # collectives take tensors only
        assert_same(*_both("gather", tensors))
        assert_same(*_both("broadcast", ours.recursively_apply(torch.clone, tensors), from_process=1))
        floats = ours.recursively_apply(lambda t: t.float(), tensors)
        for reduction in ("sum", "mean", "max"):
            assert_same(*_both("reduce", floats, reduction=reduction))
        ragged = ours.recursively_apply(lambda t: t[: t.shape[0] - rank] if t.ndim else t, tensors)
        for pad_first in (False, True):
            assert_same(*_both("pad_across_processes", ragged, dim=0, pad_index=-1, pad_first=pad_first))
        checked.append(str(index))
    objects = [{"rank": rank}, f"text {rank}", (rank, None)]
    theirs, mine = _both("gather_object", objects)
    assert theirs == mine
    theirs, mine = _both("broadcast_object_list", [rank, {"r": rank}], from_process=1)
    assert theirs == mine == [1, {"r": 1}]
    # copy_tensor_to_devices is not compared: Accelerate 1.15's raises TypeError on the receiving ranks.
    AcceleratePartialState._reset_state()
    return checked


def test_collectives_agree_with_accelerate_on_two_ranks(ranks2: RankPool) -> None:
    for checked in ranks2.run(_on_rank_collectives_agree):
        assert len(checked) >= 6
