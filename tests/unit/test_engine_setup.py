"""What the FSDP2 and DeepSpeed engines decide before any process group is involved: the DeepSpeed config
filled from the training set-up, the precision the plugins train in, clipping over mixed gradients,
and LocalSGD on one process."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from hasten import Accelerator
from hasten.engines.deepspeed_setup import (
    SetUp,
    check_optimizer_and_scheduler,
    fill_config,
    loader_batch_size,
    micro_batch_size,
    resolve_accumulation,
)
from hasten.engines.fsdp2 import clip_grad_norm_dtensor
from hasten.engines.plugins import EnginePlugins, set_plugin_precision
from hasten.local_sgd import LocalSGD
from hasten.utils import (
    DeepSpeedPlugin,
    DummyOptim,
    DummyScheduler,
    FullyShardedDataParallelPlugin,
    PrecisionType,
)
from hasten.utils.errors import ConfigurationError


def _plugin(**config: object) -> DeepSpeedPlugin:
    base: dict[str, object] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 2},
    }
    return DeepSpeedPlugin(hf_ds_config={**base, **config})


def _setup(*sizes: int, steps: int = 1, processes: int = 2, split: bool = False) -> SetUp:
    return SetUp(tuple(sizes), steps, processes, split)


def test_micro_batch_comes_from_the_loaders() -> None:
    plugin = _plugin()
    assert micro_batch_size(plugin, _setup(8, 16)) == 8
    assert micro_batch_size(plugin, _setup(8, 16, split=True)) == 4
    plugin.is_train_batch_min = False
    assert micro_batch_size(plugin, _setup(8, 16)) == 16
    assert micro_batch_size(_plugin(train_micro_batch_size_per_gpu=3), _setup()) == 3
    with pytest.raises(ConfigurationError, match="no data loader with a batch size was prepared"):
        micro_batch_size(plugin, _setup())


def test_loader_batch_size_is_read_from_the_loader_or_its_sampler() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(10))
    assert loader_batch_size(torch.utils.data.DataLoader(data, batch_size=3)) == 3
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.SequentialSampler(data), batch_size=5, drop_last=False
    )
    assert loader_batch_size(torch.utils.data.DataLoader(data, batch_sampler=sampler)) == 5
    assert loader_batch_size(object()) is None


def test_accumulation_steps_of_the_config_win(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_accumulation(_plugin(), 4) == 4
    with caplog.at_level(logging.WARNING, logger="hasten.engines.deepspeed_setup"):
        assert resolve_accumulation(_plugin(gradient_accumulation_steps=2), 4) == 2
    assert "DeepSpeed's value is used" in caplog.text


@pytest.mark.parametrize(
    ("config", "optimizer", "scheduler", "message"),
    [
        ({"optimizer": {}}, torch.optim.SGD, None, "has an 'optimizer' section and the code passes a torch"),
        ({}, DummyOptim, None, "DummyOptim stands for the 'optimizer' section"),
        (
            {"scheduler": {}},
            torch.optim.SGD,
            "step",
            "has a 'scheduler' section and the code passes a scheduler",
        ),
        ({"optimizer": {}}, DummyOptim, "dummy", "DummyScheduler stands for the 'scheduler' section"),
        (
            {"optimizer": {}},
            DummyOptim,
            "step",
            "the scheduler must be a DummyScheduler too",
        ),
    ],
)
def test_optimizer_and_scheduler_must_agree_with_the_config(
    config: dict[str, object], optimizer: type, scheduler: str | None, message: str
) -> None:
    parameters = [torch.nn.Parameter(torch.ones(1))]
    built = optimizer(parameters, lr=0.1)
    if scheduler == "step":
        inner = built if isinstance(built, torch.optim.Optimizer) else torch.optim.SGD(parameters, lr=0.1)
        made: object = torch.optim.lr_scheduler.StepLR(inner, step_size=1)
    else:
        made = None if scheduler is None else DummyScheduler(built)
    with pytest.raises(ConfigurationError, match=message):
        check_optimizer_and_scheduler(config, built, made)


def test_fill_config_from_the_set_up_and_the_placeholders() -> None:
    plugin = _plugin(
        gradient_clipping="auto",
        optimizer={"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        scheduler={
            "type": "WarmupDecayLR",
            "params": dict.fromkeys(
                ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps"), "auto"
            ),
        },
        zero_optimization={
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
    )
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(hidden_sizes=[8, 10])  # type: ignore[assignment]
    optimizer = DummyOptim(model.parameters(), lr=0.02, weight_decay=0.1)
    scheduler = DummyScheduler(optimizer, total_num_steps=9, warmup_num_steps=0)
    config = fill_config(plugin, model, optimizer, scheduler, _setup(4, steps=2, processes=2))
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 16)
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 1.0
    assert config["optimizer"]["params"] == {"lr": 0.02, "weight_decay": 0.1}
    assert config["scheduler"]["params"] == {
        "warmup_min_lr": 0,
        "warmup_max_lr": 0.02,
        "warmup_num_steps": 1,  # DeepSpeed refuses 0
        "total_num_steps": 5,  # 9 steps over 2 processes, rounded up
    }
    zero = config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (100, 90)
    assert zero["stage3_param_persistence_threshold"] == 100
    assert "zero_allow_untested_optimizer" not in config  # the config's own optimizer is DeepSpeed's


def test_fill_config_names_what_it_cannot_derive() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigurationError, match=r"derived from model.config.hidden_size, but this Linear"):
        fill_config(
            _plugin(zero_optimization={"stage": 3, "reduce_bucket_size": "auto"}),
            model,
            optimizer,
            None,
            _setup(2),
        )
    plugin = _plugin(zero_optimization={"stage": 2, "sub_group_size": "auto"})
    with pytest.raises(
        ConfigurationError,
        match=r"sets 'zero_optimization.sub_group_size' to 'auto' but the training set-up gives no value",
    ):
        fill_config(plugin, model, optimizer, None, _setup(2))
    assert plugin.deepspeed_config["zero_allow_untested_optimizer"] is True


def test_plugins_learn_the_precision() -> None:
    fsdp = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert set_plugin_precision(EnginePlugins(fsdp=fsdp), PrecisionType.BF16) == PrecisionType.BF16
    assert fsdp.mixed_precision_policy.param_dtype == torch.bfloat16
    bf16 = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    other = DeepSpeedPlugin(zero_stage=3)
    plugins = EnginePlugins(deepspeed={"main": bf16, "other": other})
    assert (
        set_plugin_precision(plugins, PrecisionType.NO) == PrecisionType.BF16
    )  # the config's precision wins
    assert bf16.selected and not other.selected
    fp16 = EnginePlugins(deepspeed={"main": DeepSpeedPlugin(zero_stage=2)})
    assert set_plugin_precision(fp16, PrecisionType.FP16) == PrecisionType.FP16
    assert (
        set_plugin_precision(EnginePlugins(deepspeed={"a": DeepSpeedPlugin()}), PrecisionType.NO)
        == PrecisionType.NO
    )


def test_clipping_over_plain_gradients_is_torchs() -> None:
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(1))).sum().backward()
    norm = clip_grad_norm_dtensor(ours.parameters(), 0.5)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert float(clip_grad_norm_dtensor(torch.nn.Linear(2, 2).parameters(), 1.0)) == 0.0  # no gradients


def test_local_sgd_on_one_process_does_nothing_and_checks_its_steps() -> None:
    accelerator = Accelerator()
    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    with LocalSGD(accelerator, model, local_sgd_steps=1) as local_sgd:
        local_sgd.step()
    assert not local_sgd.enabled and local_sgd.num_steps == 1 and torch.equal(model.weight, before)
    for steps in (0, 1.5, True):
        with pytest.raises(
            ConfigurationError, match=f"local_sgd_steps={steps!r} must be an int of at least 1"
        ):
            LocalSGD(accelerator, model, local_sgd_steps=steps)  # type: ignore[arg-type]
