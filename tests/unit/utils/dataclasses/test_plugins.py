"""TorchDynamoPlugin and GradientAccumulationPlugin: environment, precedence, validation, a real compile."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from hasten.utils.dataclasses.enums import DynamoBackend
from hasten.utils.dataclasses.plugins.dynamo import TorchDynamoPlugin
from hasten.utils.dataclasses.plugins.gradient import GradientAccumulationPlugin
from hasten.utils.environment import patch_environment

DYNAMO_ENVIRONMENTS = [
    {},
    {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_MODE": "max-autotune"},
    {"ACCELERATE_DYNAMO_BACKEND": "eager", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "true",
     "ACCELERATE_DYNAMO_USE_DYNAMIC": "false", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1"},
]  # fmt: skip


@pytest.mark.parametrize("environment", DYNAMO_ENVIRONMENTS, ids=["empty", "inductor", "eager-flags"])
def test_dynamo_reads_the_launcher_environment_like_accelerate(environment: dict[str, str]) -> None:
    with patch_environment(**environment):
        ours = TorchDynamoPlugin()
        accelerate = pytest.importorskip("accelerate.utils")
        theirs = accelerate.TorchDynamoPlugin()
    assert ours.to_dict() == theirs.to_dict()


def test_explicit_arguments_win_and_to_kwargs_lists_changes() -> None:
    with patch_environment(ACCELERATE_DYNAMO_BACKEND="INDUCTOR", ACCELERATE_DYNAMO_MODE="max-autotune"):
        plugin = TorchDynamoPlugin(backend="eager", mode="default")
    assert plugin.backend is DynamoBackend.EAGER and plugin.mode == "default"
    assert TorchDynamoPlugin(backend="inductor", fullgraph=True).to_kwargs() == {"backend": "inductor", "fullgraph": True}
    assert TorchDynamoPlugin().to_kwargs() == {}


def test_dynamo_validation_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"backend.*'TURBO'"):
        TorchDynamoPlugin(backend="turbo")
    with pytest.raises(ValueError, match=r"mode='fast' must be one of \['default', 'reduce-overhead'"):
        TorchDynamoPlugin(mode="fast")
    with patch_environment(ACCELERATE_DYNAMO_USE_FULLGRAPH="maybe"):
        with pytest.raises(ValueError, match=r"ACCELERATE_DYNAMO_USE_FULLGRAPH='maybe' must be a bool"):
            TorchDynamoPlugin()
    with pytest.raises(ValueError, match=r"use_regional_compilation=True but Sequential has no nn.ModuleList"):
        TorchDynamoPlugin(backend="eager", use_regional_compilation=True).compile(nn.Sequential(nn.Linear(2, 2)))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_inductor_compile_matches_eager() -> None:
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(4, 8)
    expected = model(x)
    compiled = TorchDynamoPlugin(backend="inductor").compile(model)
    assert compiled is not model and compiled._orig_mod is model
    assert torch.allclose(compiled(x), expected, atol=1e-5)
    regional = TorchDynamoPlugin(backend="eager", use_regional_compilation=True).compile(Stack().eval())
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None for block in regional.blocks)
    assert TorchDynamoPlugin().compile(model) is model  # backend "no"


def test_gradient_accumulation_reads_its_variable_and_validates() -> None:
    assert GradientAccumulationPlugin().num_steps is None
    with patch_environment(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4"):
        assert GradientAccumulationPlugin().num_steps == 4
        assert GradientAccumulationPlugin(num_steps=2).num_steps == 2
    with pytest.raises(ValueError, match=r"num_steps=0 must be a positive int"):
        GradientAccumulationPlugin(num_steps=0)
    with pytest.raises(ValueError, match=r"sync_each_batch='yes' must be True or False"):
        GradientAccumulationPlugin(sync_each_batch="yes")  # type: ignore[arg-type]
    assert GradientAccumulationPlugin(num_steps=8, sync_each_batch=True).to_kwargs() == {"num_steps": 8,
                                                                                        "sync_each_batch": True}  # fmt: skip
    accelerate = pytest.importorskip("accelerate.utils")
    assert dataclasses.asdict(GradientAccumulationPlugin(num_steps=3)) == dataclasses.asdict(
        accelerate.GradientAccumulationPlugin(num_steps=3))  # fmt: skip
