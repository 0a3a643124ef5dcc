"""The parts of `hasten.utils.fsdp_utils` that need no process group: re-tying weights after an init
function, switching an optimizer's parameters, names, policies, the RAM-efficient-loading toggles,
refusing FSDP1 without an accelerator, and merge errors. Sharding itself runs in tests/dist."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hasten.state import AcceleratorState
from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError
from hasten.utils.fsdp_utils import (
    disable_fsdp_ram_efficient_loading,
    enable_fsdp_ram_efficient_loading,
    ensure_weights_retied,
    fsdp2_apply_ac,
    fsdp2_canonicalize_names,
    fsdp2_prepare_auto_wrap_policy,
    fsdp2_switch_optimizer_parameters,
    get_fsdp2_grad_scaler,
    get_parameters_from_modules,
    merge_fsdp_weights,
    save_fsdp_model,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._tied_weights_keys = ["head.weight"]
        self.embed = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.embed.weight


def test_ensure_weights_retied_keeps_ties_that_an_init_function_breaks() -> None:
    with torch.device("meta"):
        model, broken = Tied(), Tied()

    def materialise(module: nn.Module) -> nn.Module:
        return module.to_empty(device="cpu", recurse=False)

    init = ensure_weights_retied(materialise, model, torch.device("cpu"))
    assert init is not materialise
    for module in (model.embed, model.head):  # FSDP1 calls it module by module
        init(module)
    assert model.head.weight is model.embed.weight
    untied = nn.Linear(2, 2)
    assert ensure_weights_retied(materialise, untied, torch.device("cpu")) is materialise
    for module in (broken.embed, broken.head):
        materialise(module)
    assert broken.head.weight is not broken.embed.weight  # what the wrapper prevents


def test_switch_optimizer_parameters_by_tensor_or_by_accelerates_pointer() -> None:
    old = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))]
    new = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": [old[0]]}, {"params": [old[1]], "lr": 0.5}], lr=0.1)
    fsdp2_switch_optimizer_parameters(optimizer, dict(zip(old, new)))
    assert (
        optimizer.param_groups[0]["params"][0] is new[0] and optimizer.param_groups[1]["params"][0] is new[1]
    )
    assert optimizer.param_groups[1]["lr"] == 0.5
    # Accelerate swaps in placeholders that carry the original pointer as a `data_ptr` attribute
    optimizer = torch.optim.SGD(old, lr=0.1)
    for index, parameter in enumerate(optimizer.param_groups[0]["params"]):
        placeholder = torch.empty(1)
        placeholder.data_ptr = parameter.data_ptr()  # type: ignore[method-assign]
        optimizer.param_groups[0]["params"][index] = placeholder
    fsdp2_switch_optimizer_parameters(optimizer, {p.data_ptr(): q for p, q in zip(old, new)})
    assert optimizer.param_groups[0]["params"] == new


def test_switch_optimizer_parameters_refuses_gaps_and_existing_state() -> None:
    old = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.Adam(old)
    with pytest.raises(KeyError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(3,\)\) has no sharded"):
        fsdp2_switch_optimizer_parameters(optimizer, {old[0]: nn.Parameter(torch.zeros(1))})
    sum(p.sum() for p in old).backward()
    optimizer.step()
    with pytest.raises(ValueError, match=r"already has optimizer state; .* before the first step"):
        fsdp2_switch_optimizer_parameters(optimizer, {p: nn.Parameter(torch.zeros(1)) for p in old})


def test_canonical_names_drop_checkpoint_and_compile_wrappers() -> None:
    named = {
        "_orig_mod.blocks.0._checkpoint_wrapped_module.up.weight": 1,
        "blocks.1._orig_mod.up.weight": 2,
        "head.weight": 3,
    }
    assert fsdp2_canonicalize_names(named) == {
        "blocks.0.up.weight": 1,
        "blocks.1.up.weight": 2,
        "head.weight": 3,
    }


def test_parameters_from_modules_by_regex_or_list() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    assert get_parameters_from_modules("0|2", model, "cpu") == set(model.parameters())
    assert get_parameters_from_modules([model[2]], model, "cpu") == set(model[2].parameters())
    assert get_parameters_from_modules(None, model, "cpu") == set()


def test_grad_scaler_takes_the_given_arguments() -> None:
    scaler = get_fsdp2_grad_scaler(device="cpu", init_scale=8.0)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == 8.0


def test_ram_efficient_loading_toggles_write_what_transformers_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)
    enable_fsdp_ram_efficient_loading()
    assert os.environ["ACCELERATE_USE_FSDP"] == "True"
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "True"
    disable_fsdp_ram_efficient_loading()
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "False"
    del os.environ["ACCELERATE_USE_FSDP"], os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"]
    with patch_environment(ACCELERATE_USE_FSDP="false", FSDP_CPU_RAM_EFFICIENT_LOADING="False"):
        enable_fsdp_ram_efficient_loading()  # an explicit choice is kept
        assert os.environ["ACCELERATE_USE_FSDP"] == "false"
        disable_fsdp_ram_efficient_loading()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.linear(x), 0.5, self.training)  # recomputed in backward


def _model() -> nn.Module:
    return nn.Sequential(Block(), Block(), nn.Linear(4, 1))


def test_auto_wrap_policy_selects_the_blocks_or_nothing() -> None:
    model = _model()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"]
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert policy is not None
    assert [policy(module) for module in model] == [True, True, False] and not policy(model)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="no_wrap")
    assert fsdp2_prepare_auto_wrap_policy(plugin, model) is None
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Layer"]
    )
    with pytest.raises(ConfigurationError, match="has 'Layer', but the model has no module of that class"):
        fsdp2_prepare_auto_wrap_policy(plugin, model)


def test_activation_checkpointing_needs_an_fsdp2_plugin_on_the_state() -> None:
    with pytest.raises(
        ConfigurationError, match="needs an FSDP2 plugin on the accelerator's state, found none"
    ):
        fsdp2_apply_ac(AcceleratorState(), _model())


def test_activation_checkpointing_on_one_process_keeps_the_gradients() -> None:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"]
    )
    state = AcceleratorState(fsdp_plugin=plugin)
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    reference = nn.Sequential(Block(), Block())
    reference.load_state_dict(model.state_dict())
    fsdp2_apply_ac(state, model)
    assert [type(m).__name__ for m in model] == ["CheckpointWrapper", "CheckpointWrapper"]
    inputs = torch.randn(3, 4)
    for net in (model, reference):
        torch.manual_seed(1)
        net(inputs).sum().backward()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours.grad, theirs.grad)  # recomputation replays the same random numbers


def test_fsdp1_checkpoints_say_this_machine_cannot_run_fsdp1(tmp_path: Path) -> None:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    with pytest.raises(
        ConfigurationError, match=r"fsdp_version=1 .* needs an accelerator .* use fsdp_version=2"
    ):
        save_fsdp_model(plugin, AcceleratorState(), nn.Linear(2, 2), tmp_path)


def test_merge_points_at_the_checkpoint_inside_a_folder(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no process group: DCP says it saves as one process
        dcp.save({"model": nn.Linear(2, 2).state_dict()}, checkpoint_id=tmp_path / "pytorch_model_fsdp_0")
    with pytest.raises(
        ValueError, match=r"couldn't find a valid metadata file .* pass .*pytorch_model_fsdp_0 instead"
    ):
        merge_fsdp_weights(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="couldn't find a valid metadata file"):
        merge_fsdp_weights(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    path = merge_fsdp_weights(
        str(tmp_path / "pytorch_model_fsdp_0"), str(tmp_path / "out"), safe_serialization=False
    )
    assert path == tmp_path / "out" / "pytorch_model.bin"
    assert set(torch.load(path, weights_only=True)) == {"weight", "bias"}
