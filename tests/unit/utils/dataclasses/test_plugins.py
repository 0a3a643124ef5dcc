"""Gradient accumulation, torch.compile and Megatron-LM plugins: defaults, environment, precedence,
validation,
and a real inductor compile on CPU."""

from __future__ import annotations

import pytest
import torch

from hasten.utils.dataclasses import (
    DynamoBackend,
    GradientAccumulationPlugin,
    MegatronLMPlugin,
    TorchDynamoPlugin,
)
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


def test_gradient_accumulation_defaults_environment_and_precedence() -> None:
    plugin = GradientAccumulationPlugin()
    assert (
        plugin.num_steps,
        plugin.adjust_scheduler,
        plugin.sync_with_dataloader,
        plugin.sync_each_batch,
    ) == (
        None,
        True,
        True,
        False,
    )
    assert plugin.to_kwargs() == {}
    with patch_environment(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4"):
        assert GradientAccumulationPlugin().num_steps == 4
        assert GradientAccumulationPlugin(num_steps=2).num_steps == 2
    assert GradientAccumulationPlugin(num_steps=2, sync_each_batch=True).to_kwargs() == {
        "num_steps": 2,
        "sync_each_batch": True,
    }


def test_gradient_accumulation_validation() -> None:
    with pytest.raises(ConfigurationError, match="num_steps=0 must be at least 1"):
        GradientAccumulationPlugin(num_steps=0)
    with (
        patch_environment(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="two"),
        pytest.raises(
            ConfigurationError,
            match="environment variable ACCELERATE_GRADIENT_ACCUMULATION_STEPS='two' is not an integer",
        ),
    ):
        GradientAccumulationPlugin()
    with pytest.raises(ConfigurationError, match="sync_each_batch='sometimes' is not a boolean"):
        GradientAccumulationPlugin(sync_each_batch="sometimes")  # type: ignore[arg-type]


def test_dynamo_defaults_and_to_kwargs() -> None:
    plugin = TorchDynamoPlugin()
    assert (plugin.backend, plugin.mode, plugin.fullgraph, plugin.dynamic) == (
        DynamoBackend.NO,
        "default",
        False,
        None,
    )
    assert plugin.to_kwargs() == {}
    plugin = TorchDynamoPlugin(
        backend="inductor", mode="max-autotune", dynamic=False, use_regional_compilation=True
    )
    assert plugin.to_kwargs() == {"backend": "inductor", "mode": "max-autotune", "dynamic": False}


def test_dynamo_reads_the_launcher_environment() -> None:
    with patch_environment(
        ACCELERATE_DYNAMO_BACKEND="INDUCTOR",
        ACCELERATE_DYNAMO_MODE="reduce-overhead",
        ACCELERATE_DYNAMO_USE_FULLGRAPH="true",
        ACCELERATE_DYNAMO_USE_DYNAMIC="false",
    ):
        plugin = TorchDynamoPlugin()
        explicit = TorchDynamoPlugin(backend="eager", fullgraph=False)
    assert (plugin.backend, plugin.mode, plugin.fullgraph, plugin.dynamic) == (
        DynamoBackend.INDUCTOR,
        "reduce-overhead",
        True,
        False,
    )
    assert (explicit.backend, explicit.fullgraph, explicit.mode) == (
        DynamoBackend.EAGER,
        False,
        "reduce-overhead",
    )


def test_dynamo_validation() -> None:
    with pytest.raises(
        ConfigurationError, match=r"backend='turbo' is not valid; expected one of \['NO', 'EAGER'"
    ):
        TorchDynamoPlugin(backend="turbo")  # type: ignore[arg-type]
    with (
        pytest.raises(
            ConfigurationError, match=r"environment variable ACCELERATE_DYNAMO_MODE='fastest' is not valid"
        ),
        patch_environment(ACCELERATE_DYNAMO_MODE="fastest"),
    ):
        TorchDynamoPlugin()
    with pytest.raises(ConfigurationError, match=r"options=.* must be a dict of backend options"):
        TorchDynamoPlugin(options=["triton.cudagraphs"])


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.nn.functional.gelu(block(x))
        return self.head(x)


def test_dynamo_no_backend_returns_the_model() -> None:
    model = Tiny()
    assert TorchDynamoPlugin().compile(model) is model


def test_dynamo_compiles_with_inductor_on_cpu_and_matches_eager() -> None:
    torch._dynamo.reset()
    model = Tiny().eval()
    x = torch.randn(4, 8)
    compiled = TorchDynamoPlugin(backend="inductor", fullgraph=True).compile(model)
    counters = torch._dynamo.utils.counters
    counters.clear()
    # Inductor hands its compiled module a pointer through this variable while loading it.
    with patch_environment(_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR="0"), torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one graph, compiled by inductor
    assert counters["inductor"]  # inductor ran


def test_dynamo_regional_compilation_compiles_the_repeated_blocks() -> None:
    torch._dynamo.reset()
    model = Tiny()
    assert TorchDynamoPlugin(backend="eager", use_regional_compilation=True).compile(model) is model
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model.head._compiled_call_impl is None
    x = torch.randn(2, 8)
    assert model(x).shape == (2, 2)


def test_megatron_defaults_environment_and_arguments() -> None:
    plugin = MegatronLMPlugin()
    assert (plugin.tp_degree, plugin.pp_degree, plugin.num_micro_batches, plugin.gradient_clipping) == (
        1,
        1,
        1,
        1.0,
    )
    assert plugin.megatron_lm_default_args["DDP_impl"] == "torch"
    with patch_environment(
        MEGATRON_LM_TP_DEGREE="2", MEGATRON_LM_PP_DEGREE="4", MEGATRON_LM_SEQUENCE_PARALLELISM="1"
    ):
        plugin = MegatronLMPlugin(pp_degree=2, other_megatron_args={"seed": 7}, consumed_samples=[5])
    args = plugin.megatron_lm_default_args
    assert (
        args["tensor_model_parallel_size"],
        args["pipeline_model_parallel_size"],
        args["sequence_parallel"],
    ) == (
        2,
        2,
        True,
    )
    assert (args["DDP_impl"], args["seed"], args["consumed_samples"]) == ("local", 7, [5, 0, 0])
    plugin.set_training_args(micro_batch_size=2, dp_degree=3)
    plugin.set_optimizer_type(
        torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.01, weight_decay=0.1)
    )
    plugin.set_mixed_precision("bf16")
    assert (args["global_batch_size"], args["optimizer"], args["lr"], args["bf16"]) == (6, "adam", 0.01, True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp_degree": 0}, "tp_degree=0 must be at least 1"),
        (
            {"recompute_granularity": "some"},
            r"recompute_granularity='some' is not valid; expected one of \['full', 'selective'\]",
        ),
        (
            {"lr_decay_style": "step"},
            r"lr_decay_style='step' is not valid; expected one of \['constant', 'linear', 'cosine'\]",
        ),
        ({"attention_dropout": 1.5}, "attention_dropout=1.5 is a probability"),
        ({"consumed_samples": [1, 2, 3, 4]}, "consumed_samples=.* must be a list of 1 to 3 counts"),
        ({"train_iters": 10, "train_samples": 100}, "pass only one of them"),
        ({"other_megatron_args": ["--seed"]}, "other_megatron_args=.* must be a dict"),
        ({"custom_loss_function": "mse"}, "custom_loss_function='mse' must be a function"),
    ],
)
def test_megatron_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        MegatronLMPlugin(**kwargs)  # type: ignore[arg-type]


def test_megatron_rejects_an_optimizer_it_cannot_translate() -> None:
    plugin = MegatronLMPlugin()
    with pytest.raises(ConfigurationError, match="optimizer Adagrad has no Megatron-LM equivalent"):
        plugin.set_optimizer_type(torch.optim.Adagrad(torch.nn.Linear(2, 2).parameters()))
