"""Sizes and device maps agree with Accelerate's on a zoo of models, except where Accelerate is wrong."""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

from accelerate.utils import modeling as theirs  # noqa: E402

from hasten.big_modeling import init_empty_weights  # noqa: E402
from hasten.utils import device_map as ours_map  # noqa: E402
from hasten.utils import device_map_checks as ours_checks  # noqa: E402
from hasten.utils import memory_budget as ours_budget  # noqa: E402
from hasten.utils import modeling as ours  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", torch.ones(width, dtype=torch.int64))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.layers = nn.ModuleList(Block(32) for _ in range(4))
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.ones(32))  # a parameter directly on the root


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"a": Block(16), "b": nn.ModuleList([Block(16), Block(8)])})
        self.bias = nn.Parameter(torch.zeros(16))
        self.out = nn.Linear(16, 3)
        self.register_buffer("steps", torch.zeros(4))


def _zoo() -> Iterator[tuple[str, nn.Module, list[str]]]:
    yield "mlp", nn.Sequential(*(nn.Linear(64, 64) for _ in range(8))), []
    yield "tied", Tied(), ["Block"]
    yield "tied-split", Tied(), []
    yield "nested", Nested(), ["Block"]
    yield "nested-split", Nested(), []
    transformers = pytest.importorskip("transformers")
    with init_empty_weights():
        yield (
            "gpt2",
            transformers.GPT2LMHeadModel(
                transformers.GPT2Config(
                    n_layer=3, n_embd=32, n_head=4, vocab_size=200, bos_token_id=0, eos_token_id=0
                )
            ),
            ["GPT2Block"],
        )
        yield (
            "llama",
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    num_hidden_layers=3,
                    hidden_size=32,
                    intermediate_size=64,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    vocab_size=200,
                    tie_word_embeddings=True,
                )
            ),
            ["LlamaDecoderLayer"],
        )
        yield (
            "mixtral",
            transformers.MixtralForCausalLM(
                transformers.MixtralConfig(
                    num_hidden_layers=2,
                    hidden_size=32,
                    intermediate_size=64,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    vocab_size=200,
                    num_local_experts=4,
                )
            ),
            [],
        )


ZOO = list(_zoo())


def _device_of(device_map: dict, name: str) -> object:
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        if ".".join(parts[:end]) in device_map:
            return device_map[".".join(parts[:end])]
    return None


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize(("name", "model", "no_split"), ZOO, ids=[case[0] for case in ZOO])
def test_sizes_ties_and_order_agree(name: str, model: nn.Module, no_split: list[str]) -> None:
    assert dict(ours.compute_module_sizes(model)) == dict(theirs.compute_module_sizes(model))
    assert dict(ours.compute_module_sizes(model, dtype=torch.float16)) == dict(
        theirs.compute_module_sizes(model, dtype=torch.float16)
    )
    assert sorted(ours.find_tied_parameters(model)) == sorted(theirs.find_tied_parameters(model))
    from accelerate.utils.other import get_module_children_bottom_up

    assert [n for n, _ in ours.get_module_children_bottom_up(model, return_fqns=True)] == [
        n for n, _ in get_module_children_bottom_up(model, return_fqns=True)
    ]
    assert ours.calculate_maximum_sizes(model) == theirs.calculate_maximum_sizes(model)


@pytest.mark.parametrize(("name", "model", "no_split"), ZOO, ids=[case[0] for case in ZOO])
def test_device_maps_agree(name: str, model: nn.Module, no_split: list[str]) -> None:
    """Every tensor Accelerate places goes to the same device; hasten also places the buffers of split
    modules, which Accelerate's maps omit (see test_accelerate_maps_miss_buffers_of_split_modules)."""
    total = ours.compute_module_sizes(model)[""]
    tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    cases = 0
    for fraction, devices, split, options in itertools.product(
        [0.05, 0.2, 0.6],
        [1, 3],
        [no_split, []],
        [{}, {"dtype": torch.float16}, {"fallback_allocation": True}, {"clean_result": False}],
    ):
        budget = {index: int(total * fraction) for index in range(devices)} | {
            "cpu": int(total * fraction * 1.5)
        }
        expected = dict(theirs.infer_auto_device_map(model, dict(budget), split, **options))
        got = ours_map.infer_auto_device_map(model, dict(budget), split, **options)
        if got != expected:
            for tensor in tensors:
                assert _device_of(got, tensor) is not None, f"{name}: {tensor} has no device"
                assert _device_of(expected, tensor) in (None, _device_of(got, tensor)), (
                    name,
                    budget,
                    options,
                    tensor,
                )
        assert ours_budget.get_balanced_memory(model, dict(budget), split) == theirs.get_balanced_memory(
            model, dict(budget), split
        )
        cases += 1
    assert cases == 48


def test_accelerate_maps_miss_buffers_of_split_modules() -> None:
    model = Tied()
    total = ours.compute_module_sizes(model)[""]
    budget = {0: int(total * 0.2), "cpu": int(total * 0.3)}
    theirs_map = theirs.infer_auto_device_map(model, dict(budget), [])
    with pytest.raises(ValueError, match="mask"):
        theirs.check_device_map(model, theirs_map)
    ours_checks.check_device_map(model, ours_map.infer_auto_device_map(model, dict(budget), []))


def test_bool_tensors_are_one_byte_each() -> None:
    model = nn.Module()
    model.register_buffer("flags", torch.ones(64, dtype=torch.bool))
    assert ours.compute_module_sizes(model)[""] == model.flags.untyped_storage().nbytes() == 64
    assert theirs.compute_module_sizes(model)[""] == 8  # Accelerate counts bits


def test_clean_device_map_agrees() -> None:
    device_map = {
        "a.0": 0,
        "a.1.x": 0,
        "a.1.y": 0,
        "b.c": 1,
        "b.d": 1,
        "e.0": "cpu",
        "e.1": "disk",
        "f": "disk",
    }
    assert ours_map.clean_device_map(dict(device_map)) == theirs.clean_device_map(dict(device_map))
