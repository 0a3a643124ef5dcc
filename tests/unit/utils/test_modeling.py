"""Sizes, tensors and tied weights (utils/modeling.py)."""

from __future__ import annotations

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
    retie_parameters,
    set_module_tensor_to_device,
    top_level_entries,
    walk_modules,
)


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
    set_module_tensor_to_device(model, "head.weight", "cpu", value=torch.ones(10, 4))
    assert model.head.weight is not model.embed.weight
    retie_parameters(model, [["embed.weight", "head.weight"]])
    assert model.head.weight is model.embed.weight


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
