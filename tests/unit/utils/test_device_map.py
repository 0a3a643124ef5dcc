"""Memory budgets and device maps (utils/device_map.py)."""

from __future__ import annotations

import logging
import time

import psutil
import pytest
import torch
from torch import nn

from hasten.big_modeling import init_empty_weights
from hasten.utils.device_map import (
    check_device_map,
    check_tied_parameters_on_same_device,
    clean_device_map,
    infer_auto_device_map,
)
from hasten.utils.memory_budget import get_balanced_memory, get_max_memory
from hasten.utils.modeling import compute_module_sizes


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
        self.register_buffer("position", torch.zeros(width))  # on a module that gets split


class Net(nn.Module):
    def __init__(self, depth: int = 6, width: int = 8, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 32, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def _device_of(device_map: dict, name: str) -> object:
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        if ".".join(parts[:end]) in device_map:
            return device_map[".".join(parts[:end])]
    raise AssertionError(f"{name} has no device")


def test_detected_budget_is_the_available_ram_here() -> None:
    budget = get_max_memory()
    assert list(budget) == ["cpu"] and 0 < budget["cpu"] <= psutil.virtual_memory().total


def test_budgets_are_parsed_ordered_and_not_modified() -> None:
    given = {"disk": "1TB", "cpu": "2GiB", 1: "10GB", 0: 1000}
    assert list(get_max_memory(given).items()) == [
        (0, 1000),
        (1, 10**10),
        ("cpu", 2 * 2**30),
        ("disk", 10**12),
    ]
    assert given["cpu"] == "2GiB"


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (
            {"cuda:0": 10},
            r"max_memory has the key 'cuda:0', which is not a device .*write 0 rather than 'cuda:0'",
        ),
        ({-1: 10}, r"max_memory has the key -1"),
        ({"cpu": -3}, r"max_memory\['cpu'\]: size=-3 is negative"),
        ({"cpu": "lots"}, r"max_memory\['cpu'\]: size='lots' is not a size hasten can read"),
        ({"cpu": [1]}, r"max_memory\['cpu'\]=\[1\]: give bytes as an int or a string"),
    ],
)
def test_bad_budgets_name_the_value(budget: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_max_memory(budget)


def test_maps_keep_no_split_blocks_whole_and_tied_weights_together() -> None:
    model = Net()
    total = compute_module_sizes(model)[""]
    device_map = infer_auto_device_map(model, {0: total // 3, 1: total // 3, "cpu": total // 4}, ["Block"])
    assert set(device_map.values()) >= {0, 1}
    for index in range(6):
        assert (
            len({_device_of(device_map, f"blocks.{index}.{part}") for part in ("attn.weight", "mlp.0.bias")})
            == 1
        )
    assert _device_of(device_map, "embed.weight") == _device_of(device_map, "head.weight")
    check_device_map(model, device_map)


def test_the_main_devices_keep_room_for_the_largest_layer() -> None:
    model = Net(tie=False)
    sizes = compute_module_sizes(model)
    block = sizes["blocks.0"]
    device_map = infer_auto_device_map(model, {"cpu": sizes[""] - 1}, ["Block"], clean_result=False)
    used = sum(sizes[name] for name, device in device_map.items() if device == "cpu")
    assert used + block <= sizes[""] - 1 and "disk" in device_map.values()


def test_split_modules_place_their_own_buffers() -> None:
    model = Net(depth=2, tie=False)
    sizes = compute_module_sizes(model)
    device_map = infer_auto_device_map(
        model, {"cpu": 2 * sizes["embed"] + sizes["blocks.0"] // 2}, clean_result=False
    )
    split = {name.rpartition(".")[0] for name in device_map if name.count(".") >= 2}
    assert any(f"{block}.position" in device_map for block in split)  # Accelerate leaves these out
    check_device_map(model, device_map)


def test_disk_zero_forbids_offloading_to_disk() -> None:
    model = Net()
    with pytest.raises(
        ValueError, match=r"does not fit in max_memory=\{'cpu': 100, 'disk': 0\}.*would go to disk"
    ):
        infer_auto_device_map(model, {"cpu": 100, "disk": 0})
    assert set(infer_auto_device_map(model, {"cpu": 10**9, "disk": 0}).values()) == {"cpu"}


def test_unknown_no_split_classes_warn() -> None:
    with pytest.warns(
        UserWarning, match=r"no_split_module_classes names \['Blok'\], which match no module of this Net"
    ):
        infer_auto_device_map(Net(), {"cpu": 10**6}, ["Block", "Blok"])


def test_a_real_transformer_on_meta_is_planned() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config)
    total = compute_module_sizes(model)[""]
    device_map = infer_auto_device_map(model, {0: total // 2, "cpu": total // 2}, ["LlamaDecoderLayer"])
    assert {0, "cpu"} <= set(device_map.values())
    assert all(name.count(".") <= 2 for name in device_map)  # decoder layers kept whole
    check_device_map(model, device_map)


def test_a_model_larger_than_this_machine_is_planned_on_meta() -> None:
    with init_empty_weights():
        model = nn.Sequential(*(nn.Linear(16384, 16384) for _ in range(40)))  # 43 GB in float32
    start = time.perf_counter()
    device_map = infer_auto_device_map(model, dict.fromkeys(range(4), "5GB") | {"cpu": "8GB"})
    assert time.perf_counter() - start < 5
    assert set(device_map.values()) == {0, 1, 2, 3, "cpu", "disk"}


def test_balanced_memory_spreads_the_model() -> None:
    model = Net(depth=8)
    total = compute_module_sizes(model)[""]
    balanced = get_balanced_memory(model, {0: total, 1: total, 2: total, "cpu": total}, ["Block"])
    assert (
        balanced[0] < total
        and balanced[1] == balanced[0]
        and balanced[2] == total
        and balanced["cpu"] == total
    )
    low = get_balanced_memory(model, {0: total, 1: total, 2: total}, ["Block"], low_zero=True)
    assert low[0] < balanced[0]
    assert get_balanced_memory(model, {"cpu": 5, "disk": 10}) == {"cpu": 5, "disk": 10}


def test_clean_merges_uniform_subtrees_in_place_and_in_order() -> None:
    device_map = {"a.0": 0, "a.1.x": 0, "a.1.y": 0, "b": 1, "c.0": "cpu", "c.1": "disk"}
    assert clean_device_map(device_map) is device_map
    assert list(device_map.items()) == [("a", 0), ("b", 1), ("c.0", "cpu"), ("c.1", "disk")]
    assert clean_device_map({"x.0": 1, "x.1": 1}) == {"": 1}
    assert clean_device_map({"a.0": 0, "a.1": 0, "b.0": 0, "b.1": 1}, module_name="a") == {
        "a": 0,
        "b.0": 0,
        "b.1": 1,
    }
    assert clean_device_map({"only.one": 0}) == {"only.one": 0}


def test_check_device_map_lists_uncovered_weights_and_warns_on_unknown_keys() -> None:
    model = Net(depth=2)
    with pytest.raises(
        ValueError,
        match=r"^The device_map provided does not give any device for the following parameters: "
        r"\['blocks.1.position', .*these 3 weight\(s\)",
    ):
        check_device_map(model, {"embed": 0, "head": 0, "blocks.0": 0, "blocks.1.mlp": 0})
    with pytest.warns(UserWarning, match=r"do not match any submodules in the model: \['nope'\]"):
        check_device_map(model, {"": "cpu", "nope": 0})


def test_tied_parameters_on_different_devices_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check_tied_parameters_on_same_device(
            [["embed.weight", "head.weight"]], {"embed": 0, "head": "cpu", "": 1}
        )
    assert (
        "Tied parameters are on different devices: {'embed.weight': 0, 'head.weight': 'cpu'}" in caplog.text
    )
    with pytest.raises(ValueError, match=r"no device for 'x.weight'"):
        check_tied_parameters_on_same_device([["x.weight", "y.weight"]], {"y": 0})
