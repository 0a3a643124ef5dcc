"""Sizes, tensors and tied weights (utils/modeling.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from hasten.big_modeling import init_empty_weights
from hasten.utils.dataclasses.enums import CustomDtype
from hasten.utils.modeling import (
    calculate_maximum_sizes,
    compute_module_sizes,
    compute_module_total_buffer_size,
    convert_file_size_to_int,
    dtype_byte_size,
    find_tied_parameters,
    get_max_layer_size,
    get_module_children_bottom_up,
    named_module_tensors,
    top_level_entries,
    walk_modules,
)
from hasten.utils.placement import retie_parameters, set_module_tensor_to_device


class Block(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.ones(4))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1234, 1234),
        ("1KiB", 1024),
        ("10GiB", 10 * 2**30),
        ("10GB", 10 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5MiB", int(1.5 * 2**20)),
        (" 2 kb", 2000 // 8),
        ("0GB", 0),
    ],
)
def test_sizes_parse_like_accelerate(text: int | str, expected: int) -> None:
    assert convert_file_size_to_int(text) == expected


@pytest.mark.parametrize("text", ["ten GB", "10", "10XB", "", "GB"])
def test_unreadable_sizes_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=rf"size={text!r} is not a size hasten can read: .*'GIB'.*'10GiB'"):
        convert_file_size_to_int(text)


def test_negative_and_mistyped_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"size=-5 is negative"):
        convert_file_size_to_int(-5)
    for text in ("-1GB", "-0.5 MiB"):
        with pytest.raises(ValueError, match=rf"size={text!r} is negative; a memory size must be at least 0"):
            convert_file_size_to_int(text)
    with pytest.raises(TypeError, match=r"size=1.5 must be an int \(bytes\) or a string"):
        convert_file_size_to_int(1.5)  # type: ignore[arg-type]


def test_dtype_sizes_cover_packed_and_float8_types() -> None:
    assert dtype_byte_size(torch.float32) == 4 and dtype_byte_size(torch.bfloat16) == 2
    assert dtype_byte_size(torch.bool) == 1  # as torch stores it (Accelerate says 1/8)
    assert dtype_byte_size(torch.float8_e4m3fn) == 1 and dtype_byte_size(torch.complex64) == 8
    assert dtype_byte_size(CustomDtype.INT4) == 0.5 and dtype_byte_size(CustomDtype.INT2) == 0.25
    assert dtype_byte_size(CustomDtype.FP8) == 1 and dtype_byte_size("torch.float16") == 2
    with pytest.raises(
        ValueError, match=r"dtype='float17' is not a torch dtype: .*\['fp8', 'int4', 'int2'\]"
    ):
        dtype_byte_size("float17")


def test_sizes_count_tied_weights_once_and_skip_empty_modules() -> None:
    model = Tied()
    sizes = compute_module_sizes(model)
    embed, block = 10 * 4 * 4, (4 * 4 + 4) * 4 + 3 * 8 + 2 * 4
    assert sizes["embed"] == sizes["embed.weight"] == embed
    assert "head" not in sizes and "head.weight" not in sizes  # only the tied weight lives there
    assert "act" not in sizes and sizes["missing"] == 0
    assert sizes["blocks.0"] == block and sizes["blocks"] == 2 * block
    assert sizes[""] == embed + 2 * block + 16


def test_target_dtype_shrinks_floats_only_and_special_dtypes_win() -> None:
    model = Tied()
    half = compute_module_sizes(model, dtype=torch.float16)
    assert half["embed.weight"] == 10 * 4 * 2 and half["blocks.0.steps"] == 3 * 8  # int64 kept
    assert compute_module_sizes(model, dtype="float64")["embed.weight"] == 160  # never grows
    special = compute_module_sizes(model, dtype=torch.float16, special_dtypes={"scale": torch.float32})
    assert special["scale"] == 16 and special["embed.weight"] == 80


@pytest.mark.parametrize(
    ("dtype", "per_element"),
    [(CustomDtype.INT4, 0.5), ("int4", 0.5), (CustomDtype.INT2, 0.25), (CustomDtype.FP8, 1), (torch.int8, 1)],
)
def test_packed_dtypes_size_floats_at_their_packed_width(
    dtype: CustomDtype | str, per_element: float
) -> None:
    model = Tied()
    sizes = compute_module_sizes(model, dtype=dtype)
    assert sizes["embed.weight"] == 40 * per_element and sizes["blocks.0.linear"] == 20 * per_element
    assert sizes["blocks.0.steps"] == 3 * 8  # integer buffers are never cast
    special = compute_module_sizes(model, special_dtypes={"embed.weight": dtype})
    assert special["embed.weight"] == 40 * per_element and special["scale"] == 16
    total, (largest, _) = calculate_maximum_sizes(model, dtype=dtype)
    assert total == sizes[""] and largest == max(sizes["embed"], sizes["blocks.0.linear"], sizes["scale"])


def test_buffer_sizes() -> None:
    model = Tied()
    buffers = compute_module_sizes(model, buffers_only=True)
    assert set(buffers) == {
        "",
        "blocks",
        "blocks.0",
        "blocks.1",
        "blocks.0.steps",
        "blocks.0.scratch",
        "blocks.1.steps",
        "blocks.1.scratch",
    }
    assert compute_module_total_buffer_size(model) == 2 * (24 + 8)


def test_walk_matches_named_modules_including_shared_modules() -> None:
    model = Tied()
    model.again = model.blocks[0]
    for remove_duplicate in (True, False):
        expected = [(n, id(m)) for n, m in model.named_modules(remove_duplicate=remove_duplicate)]
        assert [(n, id(m)) for n, m in walk_modules(model, remove_duplicate)] == expected


def test_named_module_tensors_can_leave_out_non_persistent_buffers() -> None:
    block = Block()
    assert [n for n, _ in named_module_tensors(block, recurse=True)] == [
        "linear.weight",
        "linear.bias",
        "steps",
        "scratch",
    ]
    assert "scratch" not in dict(named_module_tensors(block, remove_non_persistent=True))
    assert list(named_module_tensors(block, include_buffers=False)) == []


def test_largest_layer_respects_no_split_classes() -> None:
    model = Tied()
    sizes = compute_module_sizes(model)
    assert get_max_layer_size(top_level_entries(model), sizes, []) == (160, ["embed"])
    block = sizes["blocks.0"]
    assert get_max_layer_size(top_level_entries(model), sizes, ["Block"]) == (160, ["embed"])
    assert get_max_layer_size([("blocks", model.blocks)], sizes, ["Block"]) == (
        block,
        ["blocks.0", "blocks.1"],
    )
    model._no_split_modules = ["Block"]  # transformers models carry this
    assert calculate_maximum_sizes(model) == (sizes[""], (160, ["embed"]))


def test_children_bottom_up_end_with_the_model() -> None:
    model = Tied()
    ordered = get_module_children_bottom_up(model, return_fqns=True)
    names = [name for name, _ in ordered]
    assert names[-1] == "" and ordered[-1][1] is model
    for name in names:
        parents = [other for other in names if other != name and (not other or name.startswith(other + "."))]
        assert all(names.index(name) < names.index(parent) for parent in parents)
    assert get_module_children_bottom_up(model)[-1] is model


def test_tied_groups_are_found_in_one_pass_and_retied() -> None:
    model = Tied()
    model.extra = nn.Linear(4, 10, bias=False)
    model.extra.weight = model.embed.weight
    assert find_tied_parameters(model) == [["embed.weight", "extra.weight", "head.weight"]]
    assert find_tied_parameters(Block()) == []
    set_module_tensor_to_device(model, "head.weight", "cpu", value=torch.ones(10, 4), dtype=torch.float64)
    assert model.head.weight is not model.embed.weight  # a new dtype needs a new tensor: the tie breaks
    retie_parameters(model, [["embed.weight", "head.weight"]])
    assert model.head.weight is model.embed.weight


def test_a_real_tensor_is_filled_in_place_and_keeps_its_identity() -> None:
    model = Tied()
    weight, steps = model.embed.weight, model.blocks[0].steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # holds the parameter objects
    value = torch.arange(40, dtype=torch.float64).reshape(10, 4)
    set_module_tensor_to_device(model, "embed.weight", "cpu", value=value)  # cast to the model's float32
    set_module_tensor_to_device(model, "blocks.0.steps", "cpu", value=torch.tensor([7, 8, 9]))
    assert model.embed.weight is weight and model.head.weight is weight and model.blocks[0].steps is steps
    assert torch.equal(weight, value.float()) and steps.tolist() == [7, 8, 9] and weight.requires_grad
    value.zero_()  # the model does not alias the value it was given
    assert weight[1, 0] == 4
    model.embed.weight.grad = torch.ones(10, 4)
    optimizer.step()  # trains what was loaded
    assert torch.equal(model.embed.weight, torch.arange(40.0).reshape(10, 4) - 0.5)
    set_module_tensor_to_device(model, "embed.weight", "cpu", value=torch.ones(10, 4), dtype=torch.float16)
    assert model.embed.weight is not weight and model.embed.weight.dtype == torch.float16  # a new dtype


def test_set_module_tensor_refuses_values_that_are_not_tensors() -> None:
    model = Tied()
    with pytest.raises(
        TypeError,
        match=r"takes a torch.Tensor, not list \(\[\[1.0, 2.0\]\]\); convert it first, e.g. "
        r"value=torch.tensor",
    ):
        set_module_tensor_to_device(model, "scale", "cpu", value=[[1.0, 2.0]])  # type: ignore[arg-type]


def test_meta_tensors_become_real_with_their_class_and_requires_grad() -> None:
    with init_empty_weights():
        model = Tied()
    model.scale.requires_grad_(False)
    value = torch.arange(4, dtype=torch.float64)
    set_module_tensor_to_device(model, "scale", "cpu", value=value)
    assert type(model.scale) is nn.Parameter and not model.scale.requires_grad
    assert model.scale.dtype == torch.float32 and torch.equal(model.scale, value.float())  # the model's dtype
    set_module_tensor_to_device(model, "embed.weight", "cpu", value=torch.ones(10, 4), dtype=torch.float16)
    assert model.embed.weight.dtype == torch.float16 and model.embed.weight.requires_grad
    set_module_tensor_to_device(model, "blocks.0.steps", "cpu", value=torch.arange(3), dtype=torch.float16)
    assert model.blocks[0].steps.dtype == torch.int64  # integer buffers are never cast


def test_set_module_tensor_errors_name_the_tensor() -> None:
    with init_empty_weights():
        model = Tied()
    with pytest.raises(
        ValueError, match=r"tensor_name='blocks.0.nope': Block has no parameter or buffer 'nope'"
    ):
        set_module_tensor_to_device(model, "blocks.0.nope", "cpu", value=torch.ones(1))
    with pytest.raises(ValueError, match=r"tensor_name='blockz.0.w': Tied has no submodule 'blockz'"):
        set_module_tensor_to_device(model, "blockz.0.w", "cpu")
    with pytest.raises(
        ValueError,
        match=r'^Trying to set a tensor of shape torch.Size\(\[5\]\) in "scale" \(which has shape '
        r"torch.Size\(\[4\]\)\), this looks incorrect\. .*does not match this model",
    ):
        set_module_tensor_to_device(model, "scale", "cpu", value=torch.ones(5))
    with pytest.raises(ValueError, match=r"'scale' is on the meta device: pass `value` to place it on 'cpu'"):
        set_module_tensor_to_device(model, "scale", "cpu")
    model.head.register_parameter("bias", None)
    with pytest.raises(
        ValueError, match=r"tensor_name='head.bias' is registered as None; there is no tensor"
    ):
        set_module_tensor_to_device(model, "head.bias", "cpu", value=torch.ones(10))


def test_meta_to_meta_casts_floats_only() -> None:
    with init_empty_weights(include_buffers=True):
        model = Tied()
    set_module_tensor_to_device(model, "scale", "meta", dtype=torch.float16)
    set_module_tensor_to_device(model, "blocks.0.steps", "meta", dtype=torch.float16)
    assert model.scale.dtype == torch.float16 and isinstance(model.scale, nn.Parameter)
    assert model.blocks[0].steps.dtype == torch.int64


def test_tied_params_map_shares_one_copy_per_device() -> None:
    model = Tied()
    pointer = model.embed.weight.data_ptr()
    shared: dict[int, dict[object, torch.Tensor]] = {pointer: {}}
    set_module_tensor_to_device(model, "embed.weight", "meta", tied_params_map=shared)
    assert shared[pointer]["meta"] is model.embed.weight
    set_module_tensor_to_device(model, "head.weight", "meta", tied_params_map=shared)
    assert model.head.weight is model.embed.weight  # the copy already on that device, not a second one


def test_ties_and_shared_modules_held_only_by_the_model_are_still_found() -> None:
    # The scan consults its identity tables only for objects held more than once; a tie made and
    # then left with no outside reference is held by exactly the two modules that share it.
    model = nn.Module()
    model.a, model.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    model.b.weight = model.a.weight
    model.c = nn.Sequential(nn.Linear(4, 2))
    model.d = model.c  # the same module under two names
    ties = [["a.weight", "b.weight"], ["c.0.bias", "d.0.bias"], ["c.0.weight", "d.0.weight"]]
    assert sorted(find_tied_parameters(model)) == ties
    sizes = compute_module_sizes(model)
    assert sizes[""] == (16 + 8 + 2) * 4 and "b.weight" not in sizes and "d" not in sizes
    assert sizes["c"] == (8 + 2) * 4
    # An untied parameter that something else also holds is counted as itself, not as a tie.
    held = model.c[0].weight
    assert sorted(find_tied_parameters(model)) == ties
    assert compute_module_sizes(model)["c.0.weight"] == held.numel() * 4


def test_the_scan_learns_how_many_references_one_dict_holds() -> None:
    from hasten.utils.modeling import _count_when_held_once

    held_once = _count_when_held_once()
    store = {"w": nn.Parameter(torch.ones(1))}
    for _, value in store.items():
        assert sys.getrefcount(value) == held_once  # held by the dict alone
    model = nn.Linear(1, 1)
    model.weight = store["w"]
    for _, value in model._parameters.items():
        if value is store["w"]:
            assert sys.getrefcount(value) > held_once  # the dict above holds it too
