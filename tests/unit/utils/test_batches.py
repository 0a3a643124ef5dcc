"""hasten.utils.batches: moving, slicing, concatenating, measuring and describing batches."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch

from hasten.utils import device as device_module
from hasten.utils.batches import (
    TensorInformation,
    concatenate,
    find_batch_size,
    find_device,
    get_data_structure,
    get_shape,
    ignorant_find_batch_size,
    initialize_tensors,
    listify,
    send_to_device,
    slice_tensors,
)
from hasten.utils.device import is_device_available
from hasten.utils.errors import TreeNestingError
from tests.unit.utils.test_tree import NeedsTwoArguments

Point = namedtuple("Point", ["x", "y"])


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
    assert (
        out["a"].device.type == "cpu"
        and out["c"]["a"].device.type == "cpu"
        and out["b"].device.type == "meta"
    )
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


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1), "mps", torch.device("xpu")])
def test_send_to_device_refuses_an_accelerator_this_machine_lacks(device: Any) -> None:
    if is_device_available(torch.device(device)):
        pytest.skip(f"{device} is present here")
    with pytest.raises(
        ValueError,
        match=r"send_to_device: device=.* is not available on this machine, which has only the CPU\. "
        r"Pass a device it has, such as 'cpu'",
    ):
        send_to_device({"x": torch.ones(1), "y": [torch.ones(1)]}, device)


def test_a_device_is_available_when_its_accelerator_and_index_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "is_cuda_available", lambda: True)  # two GPUs, simulated
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert is_device_available(torch.device("cuda")) and is_device_available(torch.device("cuda", 1))
    assert not is_device_available(torch.device("cuda", 2))
    assert is_device_available(torch.device("cpu")) and is_device_available(torch.device("meta"))
    monkeypatch.setattr(device_module, "is_cuda_available", lambda: False)
    assert not is_device_available(torch.device("cuda", 0))


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
    assert (
        fresh["a"].shape == (2, 3) and fresh["a"].dtype == torch.float16 and fresh["b"][0].dtype == torch.long
    )


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
    with pytest.raises(
        TypeError, match=r"concatenate: can only concatenate tensors, but data\[0\]\['b'\] is a str"
    ):
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
    assert (
        find_device({"a": "x", "b": [1, {"c": torch.ones(1, device="meta")}], "d": torch.ones(1)}).type
        == "meta"
    )
    assert find_device(torch.ones(1)) == torch.device("cpu")
    assert find_device({"a": [1, 2]}) is None and find_device(3) is None
    loop: list[Any] = [1]
    loop.append(loop)
    assert find_device(loop) is None


def test_concatenate_names_a_container_it_cannot_rebuild() -> None:
    batch = {"m": NeedsTwoArguments({"a": torch.ones(1)}, extra=1)}
    with pytest.raises(
        TypeError, match="concatenate: a NeedsTwoArguments could not be rebuilt from a dict of its items"
    ):
        concatenate([batch, batch])


@pytest.mark.parametrize("kind", [list, tuple, dict])
def test_batch_mover_to_the_cpu_keeps_the_tensors_in_a_new_container(kind: type) -> None:
    from hasten.utils.batches import batch_mover

    x, y = torch.ones(2), torch.zeros(2, dtype=torch.long)
    batch: Any = {"x": x, "y": y} if kind is dict else kind([x, y])
    moved = batch_mover("cpu")(batch)
    values = (lambda b: list(b.values())) if kind is dict else list
    assert type(moved) is kind and all(a is b for a, b in zip(values(moved), [x, y]))
    assert kind is tuple or moved is not batch, "a list or dict the user may change is a new one"


def test_batch_mover_sends_other_batches_the_general_way() -> None:
    from hasten.utils.batches import batch_mover

    to_cpu, to_meta = batch_mover(torch.device("cpu")), batch_mover("meta", non_blocking=True)
    on_meta = to_meta([torch.ones(2), torch.ones(3)])
    assert [t.device.type for t in on_meta] == ["meta", "meta"]
    with pytest.raises(NotImplementedError, match="meta"):  # torch cannot copy a meta tensor's data
        to_cpu([torch.ones(1), on_meta[0]])
    nested = to_cpu({"a": [torch.ones(1)], "tag": "x"})
    assert nested["tag"] == "x" and nested["a"][0].device.type == "cpu"
    Pair = namedtuple("Pair", "a b")
    assert type(to_meta(Pair(torch.ones(1), torch.ones(1)))) is Pair
    with pytest.raises(ValueError, match="device='nope' cannot be used"):  # checked once, up front
        batch_mover("nope")
