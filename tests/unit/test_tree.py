"""hasten.utils.tree: the traversal core, its container rebuilding, its errors, and the operations on it."""

from __future__ import annotations

import sys
from collections import OrderedDict, UserDict, defaultdict, namedtuple
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import pytest
import torch

from hasten.utils.errors import TreeNestingError
from hasten.utils.tree import (
    TensorInformation,
    concatenate,
    find_batch_size,
    find_device,
    get_data_structure,
    get_shape,
    honor_type,
    ignorant_find_batch_size,
    initialize_tensors,
    is_namedtuple,
    is_tensor_information,
    is_torch_tensor,
    leaf_paths,
    listify,
    recursively_apply,
    send_to_device,
    slice_tensors,
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


class Movable:
    """An object with a ``.to()`` that records where it went."""

    def __init__(self) -> None:
        self.moved_to: Any = None

    def to(self, device: Any, non_blocking: bool = False) -> Movable:
        self.moved_to = (device, non_blocking)
        return self


class MovableWithoutNonBlocking:
    def to(self, device: Any) -> str:
        return f"moved to {device}"


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
    out = recursively_apply(lambda value, add, times=1: (value + add) * times, data, 10, times=2,
                            test_type=lambda value: isinstance(value, int))
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
    with pytest.raises(TreeNestingError, match=r"send_to_device: tensor is nested \d+ levels deep .*sys.setrecursionlimit"):
        send_to_device(deep, "cpu")


def test_a_recursion_error_from_the_function_itself_is_not_blamed_on_the_structure() -> None:
    def recurse(tensor: torch.Tensor) -> torch.Tensor:
        return recurse(tensor)

    with pytest.raises(RecursionError):
        recursively_apply(recurse, {"a": torch.ones(1)})


def test_flatten_and_unflatten_round_trip() -> None:
    data = {"a": [torch.ones(1), "keep", (torch.zeros(2),)], "b": Point(torch.ones(3), None)}
    leaves, spec = tree_flatten(data)
    assert [leaf.numel() for leaf in leaves] == [1, 2, 3] and spec.num_leaves == 3 and "3 leaves" in repr(spec)
    rebuilt = spec.unflatten(["A", "B", "C"])
    assert rebuilt == {"a": ["A", "keep", ("B",)], "b": Point("C", None)}
    assert leaf_paths(data) == ["data['a'][0]", "data['a'][1]", "data['a'][2][0]", "data['b'].x", "data['b'].y"]
    with pytest.raises(ValueError, match="unflatten needs 3 leaves for this structure, got 2"):
        spec.unflatten([1, 2])


def test_tree_map_skip_keys_at_any_depth() -> None:
    data = {"keep": torch.ones(1), "inner": OrderedDict(keep=torch.ones(1), move=torch.ones(1))}
    out = tree_map(double, data, skip_keys=frozenset(["keep"]))
    assert out["keep"] is data["keep"] and out["inner"]["keep"] is data["inner"]["keep"]
    assert out["inner"]["move"].item() == 2.0


# --- send_to_device -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_send_to_device_moves_every_tensor_and_keeps_every_key(device: Any) -> None:
    batch = {"ids": torch.ones(2, dtype=torch.long), "mask": [torch.ones(2)], "name": "text", "n": 3}
    out = send_to_device(batch, device)
    assert list(out) == list(batch) and out["name"] == "text" and out["n"] == 3
    assert out["ids"].device == torch.device(device) and out["mask"][0].device == torch.device(device)


def test_send_to_device_makes_no_copy_when_already_there() -> None:
    tensor = torch.ones(3)
    assert send_to_device(tensor, "cpu") is tensor
    assert send_to_device({"t": tensor}, torch.device("cpu"))["t"] is tensor


def test_send_to_device_skip_keys_as_string_or_list() -> None:
    batch = {"a": torch.ones(1), "b": torch.ones(1), "c": {"a": torch.ones(1)}}
    out = send_to_device(batch, "meta", skip_keys="a")
    assert out["a"].device.type == "cpu" and out["c"]["a"].device.type == "cpu" and out["b"].device.type == "meta"
    out = send_to_device(batch, "meta", skip_keys=["a", "b"])
    assert out["a"].device.type == "cpu" and out["b"].device.type == "cpu"


def test_send_to_device_hands_objects_with_to_to_their_method() -> None:
    movable = Movable()
    out = send_to_device([movable, MovableWithoutNonBlocking()], "cpu", non_blocking=True)
    assert out[0] is movable and movable.moved_to == (torch.device("cpu"), True)
    assert out[1] == "moved to cpu"


def test_send_to_device_honours_non_blocking() -> None:
    seen = []

    class Spy(torch.Tensor):
        def to(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            seen.append(kwargs.get("non_blocking"))
            return super().to(*args, **kwargs)

    spy = torch.ones(2).as_subclass(Spy)
    send_to_device({"x": spy}, "meta", non_blocking=True)
    assert seen == [True]


def test_send_to_device_rejects_bad_devices_and_keys() -> None:
    with pytest.raises(ValueError, match=r"send_to_device: device='gpu7' cannot be used: .* such as 'cpu'"):
        send_to_device(torch.ones(1), "gpu7")
    with pytest.raises(TypeError, match=r"device=\[0\] must be a torch.device, a device string"):
        send_to_device(torch.ones(1), [0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"skip_keys=\[\['a'\]\] must be a key or a list of keys"):
        send_to_device({"a": torch.ones(1)}, "cpu", skip_keys=[["a"]])  # type: ignore[list-item]


def test_send_to_device_accepts_an_accelerator_index() -> None:
    tensor = torch.ones(1)
    if torch.cuda.is_available():
        assert send_to_device(tensor, 0).device == torch.device("cuda", 0)
    else:
        with pytest.raises(ValueError, match=r"device=0 cannot be used: .*Pass a device this machine has"):
            send_to_device(tensor, 0)


# --- the small operations -----------------------------------------------------------------------


def test_structure_shape_and_initialise() -> None:
    data = {"a": torch.ones(2, 3, dtype=torch.float16), "b": [torch.zeros(4, dtype=torch.long)]}
    structure = get_data_structure(data)
    assert structure["a"] == TensorInformation(torch.Size([2, 3]), torch.float16)
    assert get_shape(data) == {"a": [2, 3], "b": [[4]]}
    fresh = initialize_tensors(structure)
    assert fresh["a"].shape == (2, 3) and fresh["a"].dtype == torch.float16 and fresh["b"][0].dtype == torch.long


def test_listify_converts_bfloat16_and_scalars() -> None:
    data = {"a": torch.tensor([1.5, 2.0], dtype=torch.bfloat16), "b": (torch.tensor(3),), "c": "x"}
    assert listify(data) == {"a": [1.5, 2.0], "b": (3,), "c": "x"}


def test_slice_tensors() -> None:
    data = {"a": torch.arange(6), "b": [torch.arange(4).view(2, 2)]}
    out = slice_tensors(data, slice(0, 1), process_index=0, num_processes=2)
    assert out["a"].tolist() == [0] and out["b"][0].tolist() == [[0, 1]]


def test_concatenate_nested_batches() -> None:
    batches = [{"a": torch.ones(1, 2), "b": Point(torch.zeros(2), torch.ones(1))} for _ in range(3)]
    out = concatenate(batches)
    assert out["a"].shape == (3, 2) and type(out["b"]) is Point and out["b"].x.shape == (6,)
    assert concatenate([torch.ones(2, 1), torch.ones(2, 1)], dim=1).shape == (2, 2)
    assert concatenate(["only"]) == "only"


def test_concatenate_errors_name_the_place() -> None:
    with pytest.raises(TypeError, match=r"concatenate: can only concatenate tensors, but data\[0\]\['b'\] is a str"):
        concatenate([{"b": "x"}, {"b": "y"}])
    with pytest.raises(ValueError, match=r"data\[1\]\['a'\] does not have the 2 items of data\[0\]\['a'\]"):
        concatenate([{"a": [torch.ones(1), torch.ones(1)]}, {"a": [torch.ones(1)]}])
    with pytest.raises(ValueError, match=r"lacks the key \['z'\] of data\[0\]"):
        concatenate([{"z": torch.ones(1)}, {"y": torch.ones(1)}])
    with pytest.raises(TypeError, match=r"data\[1\]\['a'\] is a int, but data\[0\]\['a'\] is a tensor"):
        concatenate([{"a": torch.ones(1)}, {"a": 3}])
    with pytest.raises(ValueError, match="must be a non-empty list of batches"):
        concatenate([])


def test_concatenate_reports_a_cycle() -> None:
    loop: list[Any] = [torch.ones(1)]
    loop.append(loop)
    with pytest.raises(TreeNestingError, match=r"data\[0\]\[1\] is data\[0\] itself"):
        concatenate([loop, loop])


def test_find_batch_size_and_its_errors() -> None:
    assert find_batch_size({"a": [torch.ones(5, 2)], "b": torch.ones(3)}) == 5
    assert find_batch_size(Point(torch.ones(4), None)) == 4
    with pytest.raises(ValueError, match=r"find_batch_size: data\['a'\] is an empty list"):
        find_batch_size({"a": []})
    with pytest.raises(TypeError, match=r"find_batch_size: data\[0\] is a str; can only find the batch size"):
        find_batch_size(["x"])
    with pytest.raises(ValueError, match=r"data\[0\] is a 0-d tensor"):
        find_batch_size([torch.tensor(1.0)])
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TreeNestingError, match="nested too deeply"):
        find_batch_size(loop)
    assert ignorant_find_batch_size({"a": []}) is None and ignorant_find_batch_size(torch.ones(2)) == 2


def test_find_device() -> None:
    assert find_device({"a": "x", "b": [1, {"c": torch.ones(1, device="meta")}], "d": torch.ones(1)}).type == "meta"
    assert find_device(torch.ones(1)) == torch.device("cpu")
    assert find_device({"a": [1, 2]}) is None and find_device(3) is None
    loop: list[Any] = [1]
    loop.append(loop)
    assert find_device(loop) is None
