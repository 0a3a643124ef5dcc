"""hasten.utils.tree: the traversal core, its container rebuilding and its errors."""

from __future__ import annotations

import gc
import sys
import weakref
from collections import OrderedDict, UserDict, defaultdict, namedtuple
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
import torch

import hasten.utils.tree as tree_module
from hasten.utils.batches import TensorInformation, is_tensor_information, send_to_device
from hasten.utils.errors import TreeNestingError
from hasten.utils.tree import (
    honor_type,
    is_namedtuple,
    is_torch_tensor,
    leaf_paths,
    recursively_apply,
    tree_flatten,
    tree_leaves,
    tree_map,
)

Point = namedtuple("Point", ["x", "y"])


class FrozenMapping(Mapping):  # a Mapping that is not a dict, built from a dict
    def __init__(self, data: dict[Any, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class NeedsTwoArguments(FrozenMapping):  # a Mapping that cannot be rebuilt from a dict
    def __init__(self, data: dict[Any, Any], extra: int) -> None:
        super().__init__(data)


def double(tensor: torch.Tensor) -> torch.Tensor:
    return tensor * 2


# --- predicates and small helpers ---------------------------------------------------------------


def test_predicates() -> None:
    assert is_torch_tensor(torch.ones(1)) and is_torch_tensor(torch.nn.Parameter(torch.ones(1)))
    assert not is_torch_tensor([1.0])
    assert is_namedtuple(Point(1, 2)) and not is_namedtuple((1, 2))
    assert is_tensor_information(TensorInformation(torch.Size([2]), torch.float32))
    assert not is_tensor_information(torch.ones(1))


def test_honor_type_rebuilds_lists_tuples_and_namedtuples() -> None:
    assert honor_type([0], (i for i in range(3))) == [0, 1, 2]
    assert honor_type((0,), (i for i in range(2))) == (0, 1)
    assert honor_type(Point(0, 0), (i for i in (3, 4))) == Point(3, 4)


# --- the traversal core -------------------------------------------------------------------------


def test_flat_fast_paths_apply_to_every_tensor() -> None:
    batch = {"a": torch.ones(2), "b": torch.zeros(1)}
    out = recursively_apply(double, batch)
    assert type(out) is dict and list(out) == ["a", "b"] and out["a"].tolist() == [2.0, 2.0]
    assert [t.tolist() for t in recursively_apply(double, [torch.ones(1), torch.ones(1)])] == [[2.0], [2.0]]
    out_tuple = recursively_apply(double, (torch.ones(1),))
    assert type(out_tuple) is tuple and out_tuple[0].item() == 2.0
    assert recursively_apply(double, torch.ones(1)).item() == 2.0


@pytest.mark.parametrize(
    "batch",
    [
        {"a": torch.ones(1), "b": "text", "c": torch.ones(1)},
        [torch.ones(1), 3, torch.ones(1), [torch.ones(1)]],
        (torch.ones(1), None, torch.ones(1)),
    ],
    ids=["dict", "list", "tuple"],
)
def test_flat_batches_with_other_leaves_fall_back_without_applying_twice(batch: Any) -> None:
    calls = []

    def record(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(tensor)
        return tensor + 1

    out = recursively_apply(record, batch)
    assert len(calls) == len(tree_leaves(batch))
    assert type(out) is type(batch)
    values = list(out.values()) if isinstance(out, dict) else list(out)
    originals = list(batch.values()) if isinstance(batch, dict) else list(batch)
    for new, old in zip(values, originals):
        if isinstance(old, torch.Tensor):
            assert new.item() == 2.0
        elif isinstance(old, list):
            assert new[0].item() == 2.0
        else:
            assert new is old


def test_containers_are_rebuilt_as_their_own_type() -> None:
    factory_dict: defaultdict[str, list[int]] = defaultdict(list, {"t": torch.ones(1)})  # type: ignore[dict-item]
    data = {
        "ordered": OrderedDict([("z", torch.ones(1)), ("a", torch.ones(1))]),
        "default": factory_dict,
        "user": UserDict({"u": torch.ones(1)}),
        "point": Point(torch.ones(1), "label"),
        "size": torch.Size([2, 3]),
        "proxy": MappingProxyType({"p": torch.ones(1)}),
        "frozen": FrozenMapping({"f": torch.ones(1)}),
        "params": [torch.nn.Parameter(torch.ones(1))],
    }
    out = recursively_apply(double, data)
    assert type(out["ordered"]) is OrderedDict and list(out["ordered"]) == ["z", "a"]
    assert type(out["default"]) is defaultdict and out["default"].default_factory is list
    assert out["default"]["missing"] == []
    assert type(out["user"]) is UserDict and out["user"]["u"].item() == 2.0
    assert type(out["point"]) is Point and out["point"].x.item() == 2.0 and out["point"].y == "label"
    assert out["size"] == torch.Size([2, 3])
    assert type(out["proxy"]) is MappingProxyType and out["proxy"]["p"].item() == 2.0
    assert type(out["frozen"]) is FrozenMapping and out["frozen"]["f"].item() == 2.0
    assert out["params"][0].item() == 2.0
    assert data["ordered"]["z"].item() == 1.0  # the input is left alone


def test_batch_encoding_keeps_its_type_and_encodings() -> None:
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)})
    encoding._n_sequences = 1
    out = recursively_apply(double, encoding)
    assert type(out) is transformers.BatchEncoding
    assert out["input_ids"].sum().item() == 12.0 and out.n_sequences == 1
    assert encoding["input_ids"].sum().item() == 6.0


def test_test_type_and_extra_arguments_reach_the_function() -> None:
    data = {"a": 1, "b": [2, "x"], "c": torch.ones(1)}
    out = recursively_apply(
        lambda value, add, times=1: (value + add) * times,
        data,
        10,
        times=2,
        test_type=lambda value: isinstance(value, int),
    )
    assert out == {"a": 22, "b": [24, "x"], "c": data["c"]}


def test_error_on_other_type_names_the_path() -> None:
    data = {"logits": torch.ones(1), "extra": [torch.ones(1), Point(torch.ones(1), "oops")]}
    with pytest.raises(TypeError) as caught:
        recursively_apply(double, data, error_on_other_type=True)
    message = str(caught.value)
    assert "data['extra'][1].y" in message and "str" in message and "'oops'" in message
    assert "is_torch_tensor" in message and "double" in message


def test_an_unbuildable_mapping_is_named_with_its_path() -> None:
    data = {"outer": [NeedsTwoArguments({"a": torch.ones(1)}, extra=1)]}
    with pytest.raises(TypeError, match=r"data\['outer'\]\[0\] is a NeedsTwoArguments could not be rebuilt"):
        recursively_apply(double, data)


def test_an_unbuildable_sequence_is_named_with_its_path() -> None:
    class Pair(tuple):  # type: ignore[type-arg]
        def __new__(cls, first: Any, second: Any) -> Pair:
            return super().__new__(cls, (first, second))

    with pytest.raises(TypeError, match=r"data\['p'\] is a .*Pair could not be rebuilt from its items"):
        recursively_apply(double, {"p": Pair(torch.ones(1), torch.ones(1))})


def test_a_cycle_is_a_clear_error_not_a_recursion_error() -> None:
    loop: list[Any] = [torch.ones(1)]
    loop.append({"back": loop})
    with pytest.raises(TreeNestingError) as caught:
        recursively_apply(double, {"x": loop})
    assert "data['x'][1]['back'] is data['x'] itself" in str(caught.value)
    assert not isinstance(caught.value, RecursionError)


def test_a_too_deep_structure_is_a_clear_error() -> None:
    deep: Any = torch.ones(1)
    for _ in range(sys.getrecursionlimit() + 10):
        deep = [deep]
    with pytest.raises(
        TreeNestingError, match=r"send_to_device: tensor is nested \d+ levels deep .*sys.setrecursionlimit"
    ):
        send_to_device(deep, "cpu")


def test_a_recursion_error_from_the_function_itself_is_not_blamed_on_the_structure() -> None:
    def recurse(tensor: torch.Tensor) -> torch.Tensor:
        return recurse(tensor)

    with pytest.raises(RecursionError):
        recursively_apply(recurse, {"a": torch.ones(1)})


def test_flatten_and_unflatten_round_trip() -> None:
    data = {"a": [torch.ones(1), "keep", (torch.zeros(2),)], "b": Point(torch.ones(3), None)}
    leaves, spec = tree_flatten(data)
    assert (
        [leaf.numel() for leaf in leaves] == [1, 2, 3] and spec.num_leaves == 3 and "3 leaves" in repr(spec)
    )
    rebuilt = spec.unflatten(["A", "B", "C"])
    assert rebuilt == {"a": ["A", "keep", ("B",)], "b": Point("C", None)}
    assert leaf_paths(data) == [
        "data['a'][0]",
        "data['a'][1]",
        "data['a'][2][0]",
        "data['b'].x",
        "data['b'].y",
    ]
    with pytest.raises(ValueError, match="unflatten needs 3 leaves for this structure, got 2"):
        spec.unflatten([1, 2])


def test_tree_map_skip_keys_at_any_depth() -> None:
    data = {"keep": torch.ones(1), "inner": OrderedDict(keep=torch.ones(1), move=torch.ones(1))}
    out = tree_map(double, data, skip_keys=frozenset(["keep"]))
    assert out["keep"] is data["keep"] and out["inner"]["keep"] is data["inner"]["keep"]
    assert out["inner"]["move"].item() == 2.0


@pytest.mark.parametrize("module", ["hasten.utils.tree", "hasten.utils.batches", "hasten.utils.precision"])
def test_the_docstring_examples_of_the_tree_layer_run(module: str) -> None:
    import doctest
    import importlib

    failed, attempted = doctest.testmod(importlib.import_module(module))
    assert attempted > 0 and failed == 0


# --- how container types are rebuilt (learned once per type) -------------------------------------


class Checked(namedtuple("Checked", ["low", "high"])):  # a namedtuple whose own __new__ must run
    __slots__ = ()
    built = 0

    def __new__(cls, low: Any, high: Any) -> Checked:
        cls.built += 1
        return super().__new__(cls, low, high)


class Counted(namedtuple("Counted", ["a", "b"])):  # a namedtuple with an __init__ that must run
    __slots__ = ()
    inits = 0

    def __init__(self, *items: Any) -> None:
        type(self).inits += 1


class Typed(NamedTuple):
    left: Any
    right: Any = None


def test_namedtuples_are_rebuilt_by_their_own_constructor_when_they_have_one() -> None:
    data = [Point(torch.ones(1), torch.ones(1)), Typed(torch.ones(1), [torch.ones(1)])]
    out = recursively_apply(double, data)
    assert type(out[0]) is Point and out[0].x.item() == 2.0 and out[0]._fields == ("x", "y")
    assert type(out[1]) is Typed and out[1].left.item() == 2.0 and out[1].right[0].item() == 2.0
    before_new, before_init = Checked.built, Counted.inits
    checked = recursively_apply(double, {"c": Checked(torch.ones(1), torch.ones(1))})["c"]
    counted = recursively_apply(double, {"c": Counted(torch.ones(1), torch.ones(1))})["c"]
    assert type(checked) is Checked and Checked.built == before_new + 2  # built here and rebuilt
    assert type(counted) is Counted and Counted.inits == before_init + 2
    assert checked.high.item() == 2.0 and counted.b.item() == 2.0


def test_the_per_type_cache_starts_over_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree_module, "_MAX_KINDS", 2)
    monkeypatch.setattr(tree_module, "_KINDS", {})
    made = [namedtuple(f"Made{i}", ["v"]) for i in range(5)]  # classes made on the fly
    for cls in made:
        out = recursively_apply(double, {"n": cls(torch.ones(1))})["n"]
        assert type(out) is cls and out.v.item() == 2.0
    assert 1 <= len(tree_module._KINDS) <= 2


def test_the_walk_frees_func_at_once_without_a_garbage_collection() -> None:
    class Doubler:
        def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
            return tensor * 2

    func = Doubler()
    alive = weakref.ref(func)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        out = tree_map(func, {"a": [torch.ones(1), Point(torch.ones(1), 3)]})
        del func
        assert alive() is None  # the walker's self-reference did not keep it (and func) alive
    finally:
        if was_enabled:
            gc.enable()
    assert out["a"][1].x.item() == 2.0 and out["a"][1].y == 3
