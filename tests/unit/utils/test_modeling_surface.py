"""The rest of `accelerate.utils.modeling`: buffers, tied-weight configs, offloaded weights, device-map
search steps, and the names it re-exports from hasten's other modules."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import hasten.utils.modeling as modeling
from hasten.big_modeling import cpu_offload, disk_offload
from hasten.utils.device_map_search import fallback_allocate, get_module_size_with_ties
from hasten.utils.modeling import (
    check_tied_parameters_in_config,
    compute_module_sizes,
    find_tied_parameters,
    get_non_persistent_buffers,
)
from hasten.utils.onload import (
    align_module_device,
    get_state_dict_from_offload,
    get_state_dict_offloaded_model,
    has_offloaded_params,
)


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.child = nn.Module()
        self.child.register_buffer("cache", torch.zeros(3), persistent=False)


def test_get_non_persistent_buffers() -> None:
    module = WithBuffers()
    assert get_non_persistent_buffers(module) == {"scratch"}
    assert get_non_persistent_buffers(module, recurse=True) == {"scratch", "cache"}
    assert get_non_persistent_buffers(module, recurse=True, fqns=True) == {"scratch", "child.cache"}


def test_check_tied_parameters_in_config_with_transformers_models() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    assert check_tied_parameters_in_config(transformers.GPT2LMHeadModel(config))
    untied = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, tie_word_embeddings=False
    )
    assert not check_tied_parameters_in_config(transformers.GPT2LMHeadModel(untied))
    assert not check_tied_parameters_in_config(transformers.GPT2Model(config))  # no output embeddings
    assert not check_tied_parameters_in_config(nn.Linear(2, 2))  # not a PreTrainedModel


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        self.register_buffer("scale", torch.full((2,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)) * self.scale


def test_offloaded_weights_are_read_module_by_module() -> None:
    torch.manual_seed(0)
    model = Net()
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert not has_offloaded_params(model.first)
    cpu_offload(model, execution_device="cpu")
    assert has_offloaded_params(model.first) and has_offloaded_params(model.second[0])
    assert model.first.weight.device.type == "meta"
    with align_module_device(model.first):
        torch.testing.assert_close(model.first.weight, expected["first.weight"])
    assert model.first.weight.device.type == "meta"  # offloaded again after the block
    state = get_state_dict_offloaded_model(model)
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor)
    partial = {"second.0.weight": None, "second.0.bias": None}
    get_state_dict_from_offload(model.second[0], "second.0.weight", partial)
    torch.testing.assert_close(partial["second.0.weight"], expected["second.0.weight"])
    torch.testing.assert_close(partial["second.0.bias"], expected["second.0.bias"])


def test_offloaded_weights_from_disk(tmp_path: object) -> None:
    model = Net()
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    disk_offload(model, str(tmp_path), execution_device="cpu")
    state = get_state_dict_offloaded_model(model)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor)


def test_align_module_device_moves_and_restores_plain_modules() -> None:
    layer = nn.Linear(2, 2)
    weight = layer.weight
    with align_module_device(layer, "meta"):
        assert layer.weight.device.type == "meta"
    assert layer.weight is weight and weight.device.type == "cpu"  # the same parameter comes back
    with align_module_device(layer):
        assert layer.weight.device.type == "cpu"


def test_placeholders_still_on_meta_are_named() -> None:
    model = Net()
    cpu_offload(
        model,
        execution_device="cpu",
        state_dict={k: v for k, v in model.state_dict().items() if k != "scale"},
    )
    model.scale = torch.empty(2, device="meta")  # a buffer nothing ever filled
    with pytest.warns(
        UserWarning, match=r"were not saved because they were still on meta device: \['scale'\]"
    ):
        state = get_state_dict_offloaded_model(model)
    assert "scale" not in state and "first.weight" in state


def _tied_model() -> nn.Module:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 10)))
    model[1][1].weight = model[0].weight  # type: ignore[index]
    return model


def test_search_steps_match_accelerate() -> None:
    accelerate_modeling = pytest.importorskip("accelerate.utils.modeling")
    model = _tied_model()
    sizes = accelerate_modeling.compute_module_sizes(model)
    tied = find_tied_parameters(model)
    ours = get_module_size_with_ties(["1.1.weight"], sizes["0"], sizes, list(model.named_children()))
    theirs = accelerate_modeling.get_module_size_with_ties(
        ["1.1.weight"], sizes["0"], sizes, list(model.named_children())
    )
    assert ours == theirs
    untied = nn.Sequential(
        nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), nn.Linear(2, 2)
    )
    untied_sizes = accelerate_modeling.compute_module_sizes(untied)
    cases = [(untied, untied_sizes, None, limit) for limit in (288, 100, 40, 24, 23, 1, "1KB")]
    cases.append((model, sizes, tied, "1KB"))
    for module, module_sizes, ties, limit in cases:
        # (Accelerate changes the list it is given: each call gets its own.)
        name, found, rest = fallback_allocate(
            list(module.named_children()), module_sizes, limit, tied_parameters=ties
        )
        their_name, their_found, their_rest = accelerate_modeling.fallback_allocate(
            list(module.named_children()), module_sizes, limit, tied_parameters=ties
        )
        assert (name, found) == (their_name, their_found), limit
        assert [entry for entry, _ in rest] == [entry for entry, _ in their_rest], limit


def test_fallback_allocate_splits_past_tied_weights() -> None:
    # Accelerate raises IndexError here: the tied weight's holder was taken off its search list.
    model = _tied_model()
    sizes = compute_module_sizes(model)
    name, found, rest = fallback_allocate(
        list(model.named_children()), sizes, 80, tied_parameters=find_tied_parameters(model)
    )
    assert name == "1.0" and found is model[1][0]  # type: ignore[index]
    assert [entry for entry, _ in rest] == ["0", "1.1"]
    assert fallback_allocate(list(model.named_children()), sizes, 10) == (
        None,
        None,
        list(model.named_children()),
    )


def test_search_steps_explain_bad_input() -> None:
    model = _tied_model()
    sizes = compute_module_sizes(model)
    with pytest.raises(
        ValueError, match=r"The tied parameter 'elsewhere.weight' lies in none of the modules"
    ):
        get_module_size_with_ties(["elsewhere.weight"], 0, sizes, list(model.named_children()))
    with pytest.raises(ValueError, match=r"size='lots' is not a size"):
        fallback_allocate(list(model.named_children()), sizes, "lots")


def test_modeling_offers_accelerates_names_from_their_homes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, home in [
            ("infer_auto_device_map", "hasten.utils.device_map"),
            ("get_balanced_memory", "hasten.utils.memory_budget"),
            ("load_checkpoint_in_model", "hasten.utils.loading"),
            ("get_grad_scaler", "hasten.utils.amp"),
            ("has_offloaded_params", "hasten.utils.onload"),
            ("fallback_allocate", "hasten.utils.device_map_search"),
        ]:
            assert getattr(modeling, name) is getattr(importlib.import_module(home), name)
    assert "infer_auto_device_map" in dir(modeling)
    with pytest.raises(AttributeError, match=r"module 'hasten.utils.modeling' has no attribute 'no_such'"):
        modeling.no_such
