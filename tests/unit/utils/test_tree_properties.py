"""Property tests over random nested structures: structure and values survive, types are honoured."""

from __future__ import annotations

from collections import OrderedDict, UserDict, defaultdict, namedtuple
from collections.abc import Mapping
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hasten.utils.batches import concatenate, listify, send_to_device
from hasten.utils.precision import convert_to_fp32
from hasten.utils.tree import leaf_paths, recursively_apply, tree_flatten, tree_leaves

Triple = namedtuple("Triple", ["a", "b", "c"])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]

tensors = st.builds(
    lambda dtype, shape, seed: (
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)) * 3
    ).to(dtype),
    st.sampled_from(DTYPES),
    st.lists(st.integers(1, 3), min_size=0, max_size=3),
    st.integers(0, 2**16),
)
others = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.floats(allow_nan=False))
keys = st.text(alphabet="abcdefgh", min_size=1, max_size=3)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(lambda d: OrderedDict(reversed(list(d.items())))),
        st.dictionaries(keys, children, max_size=3).map(lambda d: defaultdict(list, d)),
        st.dictionaries(keys, children, max_size=3).map(UserDict),
        st.tuples(children, children, children).map(lambda t: Triple(*t)),
    )


trees = st.recursive(st.one_of(tensors, others), _containers, max_leaves=25)
tensor_trees = st.recursive(tensors, _containers, max_leaves=25)


def assert_same_structure(new: Any, old: Any, same_leaves: bool) -> None:
    assert type(new) is type(old)
    if isinstance(old, torch.Tensor):
        assert new.dtype == old.dtype and new.shape == old.shape and torch.equal(new, old)
        if same_leaves:
            assert new is old
    elif isinstance(old, Mapping):
        assert list(new) == list(old)
        if isinstance(old, defaultdict):
            assert new.default_factory is old.default_factory
        for key in old:
            assert_same_structure(new[key], old[key], same_leaves)
    elif isinstance(old, (list, tuple)):
        assert len(new) == len(old)
        for a, b in zip(new, old):
            assert_same_structure(a, b, same_leaves)
    else:
        assert new is old


@settings(max_examples=150, deadline=None)
@given(trees)
def test_recursively_apply_keeps_structure_types_and_values(tree: Any) -> None:
    assert_same_structure(recursively_apply(torch.clone, tree), tree, same_leaves=False)
    assert_same_structure(recursively_apply(lambda t: t, tree), tree, same_leaves=True)


@settings(max_examples=150, deadline=None)
@given(trees)
def test_send_to_device_on_the_same_device_returns_the_same_tensors(tree: Any) -> None:
    assert_same_structure(send_to_device(tree, "cpu"), tree, same_leaves=True)


@settings(max_examples=150, deadline=None)
@given(trees)
def test_flatten_unflatten_round_trips_and_paths_lead_to_leaves(tree: Any) -> None:
    leaves, spec = tree_flatten(tree)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    assert_same_structure(spec.unflatten(leaves), tree, same_leaves=True)
    every_leaf = tree_leaves(tree, is_leaf=lambda _: True)
    paths = leaf_paths(tree, "tree")
    assert len(paths) == len(every_leaf)
    for path, leaf in zip(paths, every_leaf):
        assert eval(path, {"tree": tree}) is leaf


@settings(max_examples=100, deadline=None)
@given(trees)
def test_listify_matches_tolist_leaf_by_leaf(tree: Any) -> None:
    def by_hand(tensor: torch.Tensor) -> Any:
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).tolist()

    listed = listify(tree)
    assert listed == recursively_apply(by_hand, tree)
    assert_same_structure(
        recursively_apply(lambda t: t, listed, test_type=lambda _: False), listed, same_leaves=True
    )


@settings(max_examples=100, deadline=None)
@given(trees)
def test_convert_to_fp32_changes_only_half_dtypes(tree: Any) -> None:
    out = convert_to_fp32(tree)
    for new, old in zip(tree_leaves(out), tree_leaves(tree)):
        if old.dtype in (torch.float16, torch.bfloat16):
            assert new.dtype == torch.float32 and torch.equal(new, old.float())
        else:
            assert new is old


@settings(max_examples=100, deadline=None)
@given(tensor_trees.filter(lambda t: all(leaf.ndim > 0 for leaf in tree_leaves(t))))
def test_concatenate_doubles_every_leaf_along_dim_0(tree: Any) -> None:
    out = concatenate([tree, tree])
    for new, old in zip(tree_leaves(out), tree_leaves(tree)):
        assert torch.equal(new, torch.cat([old, old]))
    assert_same_structure(recursively_apply(lambda t: t[: t.shape[0] // 2], out), tree, same_leaves=False)
