"""Kwargs handlers: defaults, to_kwargs, validation, and the real torch objects they configure on one
process."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch

from hasten.state import AcceleratorState
from hasten.utils.amp import get_grad_scaler, get_mixed_precision_context_manager
from hasten.utils.dataclasses import (
    AutocastKwargs,
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    DistributedType,
    FP8RecipeKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    KwargsHandler,
    ProfileKwargs,
)
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


def test_to_kwargs_keeps_only_changed_fields() -> None:
    assert AutocastKwargs().to_kwargs() == {}
    assert AutocastKwargs(cache_enabled=False).to_kwargs() == {"cache_enabled": False}
    assert GradScalerKwargs(init_scale=1024.0, growth_interval=10).to_kwargs() == {
        "init_scale": 1024.0,
        "growth_interval": 10,
    }
    assert isinstance(GradScalerKwargs(), KwargsHandler)


def test_to_kwargs_reads_no_environment_for_defaults() -> None:
    """A variable that changes a field shows up in to_kwargs; the defaults are the declared ones."""
    with patch_environment(ACCELERATE_FP8_MARGIN="3"):
        recipe = FP8RecipeKwargs()
    assert recipe.to_kwargs() == {"margin": 3}


def test_autocast_validation() -> None:
    with pytest.raises(ConfigurationError, match="enabled='yes' must be True or False"):
        AutocastKwargs(enabled="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cache_enabled=1 must be True or False"):
        AutocastKwargs(cache_enabled=1)  # type: ignore[arg-type]


def test_autocast_kwargs_drive_bf16_autocast_on_cpu() -> None:
    AcceleratorState(mixed_precision="bf16", cpu=True)
    linear = torch.nn.Linear(4, 4)
    with get_mixed_precision_context_manager(native_amp=True, autocast_kwargs=AutocastKwargs()):
        assert linear(torch.randn(2, 4)).dtype == torch.bfloat16
    with get_mixed_precision_context_manager(native_amp=True, autocast_kwargs=AutocastKwargs(enabled=False)):
        assert linear(torch.randn(2, 4)).dtype == torch.float32
    with get_mixed_precision_context_manager(native_amp=False):
        assert linear(torch.randn(2, 4)).dtype == torch.float32


def test_fp16_state_autocasts_to_fp16() -> None:
    AcceleratorState(mixed_precision="fp16", cpu=True)
    with get_mixed_precision_context_manager(native_amp=True):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16


def test_grad_scaler_kwargs_drive_a_working_scaler() -> None:
    _check_scaler(get_grad_scaler(**GradScalerKwargs(init_scale=1024.0, growth_interval=1).to_kwargs()))


def _check_scaler(scaler: torch.amp.GradScaler) -> None:
    assert scaler.is_enabled() and scaler.get_scale() == 1024.0
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale((weight * 2).sum()).backward()
    assert torch.equal(weight.grad, torch.full((3,), 2048.0))  # scaled by 1024
    scaler.step(optimizer)  # unscales before stepping
    scaler.update()
    assert torch.allclose(weight.detach(), torch.full((3,), 0.8))
    assert scaler.get_scale() == 2048.0  # grew after one clean step
    optimizer.zero_grad()
    scaler.scale((weight * float("inf")).sum()).backward()
    scaler.step(optimizer)  # skipped: the gradients overflowed
    scaler.update()
    assert torch.allclose(weight.detach(), torch.full((3,), 0.8))
    assert scaler.get_scale() == 1024.0  # backed off by 0.5


def test_fsdp_gets_the_sharded_scaler() -> None:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    assert isinstance(get_grad_scaler(DistributedType.FSDP), ShardedGradScaler)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_scale": "big"}, "init_scale='big' is not a number; pass a float such as 1.0"),
        ({"init_scale": 0}, "init_scale=0.0 must be greater than 0"),
        ({"growth_factor": "fast"}, "growth_factor='fast' is not a number"),
        ({"backoff_factor": None}, "backoff_factor=None is not a number"),
        ({"growth_factor": 1.0}, "growth_factor=1.0 must be greater than 1.0"),
        ({"backoff_factor": 1.5}, "backoff_factor=1.5 must be between 0.0 and 1.0"),
        ({"growth_interval": 0}, "growth_interval=0 must be at least 1"),
        ({"enabled": None}, "enabled=None must be True or False"),
    ],
)
def test_grad_scaler_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        GradScalerKwargs(**kwargs)  # type: ignore[arg-type]


def test_init_process_group_defaults_and_timeout() -> None:
    default = InitProcessGroupKwargs()
    assert (default.backend, default.timeout) == ("nccl", datetime.timedelta(seconds=600))
    assert default.to_kwargs() == {}
    gloo = InitProcessGroupKwargs(backend="GLOO")
    assert gloo.to_kwargs() == {"backend": "gloo", "timeout": datetime.timedelta(seconds=1800)}
    assert InitProcessGroupKwargs(backend="gloo", timeout=90).timeout == datetime.timedelta(seconds=90)
    assert InitProcessGroupKwargs(backend="cpu:gloo,cuda:nccl").backend == "cpu:gloo,cuda:nccl"


def test_init_process_group_validation() -> None:
    with pytest.raises(
        ConfigurationError, match=r"backend='glooo' is not a torch.distributed backend; expected one of \["
    ):
        InitProcessGroupKwargs(backend="glooo")
    with pytest.raises(ConfigurationError, match=r"timeout=-5 must be a positive datetime.timedelta"):
        InitProcessGroupKwargs(timeout=-5)  # type: ignore[arg-type]


def test_ddp_kwargs_to_kwargs_leaves_out_the_hook() -> None:
    kwargs = DistributedDataParallelKwargs(
        bucket_cap_mb=5,
        comm_hook="power_sgd",
        comm_wrapper="fp16",
        comm_state_option={"matrix_approximation_rank": 2},
    )
    assert kwargs.to_kwargs() == {"bucket_cap_mb": 5}
    assert kwargs.comm_hook is DDPCommunicationHookType.POWER_SGD
    assert kwargs.comm_wrapper is DDPCommunicationHookType.FP16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"comm_hook": "int8"},
            r"comm_hook='int8' is not valid; expected one of \['no', 'fp16', 'bf16', 'power_sgd'",
        ),
        (
            {"comm_wrapper": "power_sgd"},
            r"comm_wrapper='power_sgd' is not a wrapper; expected one of \['no', 'fp16', 'bf16'\]",
        ),
        (
            {"comm_hook": "fp16", "comm_state_option": {"x": 1}},
            "comm_state_option=.* is only used by the hooks",
        ),
        ({"static_graph": "yes"}, "static_graph='yes' must be True or False"),
    ],
)
def test_ddp_kwargs_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DistributedDataParallelKwargs(**kwargs)  # type: ignore[arg-type]


def test_power_sgd_state_options_are_checked_before_registering() -> None:
    handler = DistributedDataParallelKwargs(comm_hook="power_sgd", comm_state_option={"rank": 1})
    with pytest.raises(
        ConfigurationError, match=r"comm_state_option has keys \['rank'\] that PowerSGDState does not take"
    ):
        handler.register_comm_hook(torch.nn.Linear(1, 1))  # type: ignore[arg-type]
    DistributedDataParallelKwargs().register_comm_hook(torch.nn.Linear(1, 1))  # type: ignore[arg-type]  # "no": nothing


def test_fp8_recipe_defaults_environment_and_validation() -> None:
    recipe = FP8RecipeKwargs()
    assert (recipe.backend, recipe.fp8_format, recipe.amax_history_len, recipe.opt_level) == (
        "TE",
        "HYBRID",
        1024,
        "O2",
    )
    assert recipe.override_linear_precision == (False, False, False)
    with patch_environment(
        ACCELERATE_FP8_BACKEND="msamp", ACCELERATE_FP8_FORMAT="e4m3", ACCELERATE_FP8_OVERRIDE_DGRAD="true"
    ):
        recipe = FP8RecipeKwargs()
    assert (recipe.backend, recipe.fp8_format, recipe.override_linear_precision) == (
        "MSAMP",
        "E4M3",
        (False, True, False),
    )
    with pytest.raises(
        ConfigurationError, match=r"backend='AO' has no recipe here; expected one of \['TE', 'MSAMP'\]"
    ):
        FP8RecipeKwargs(backend="AO")
    with pytest.raises(
        ConfigurationError, match=r"backend='cuda' is not valid; expected one of \['NO', 'TE'"
    ):
        FP8RecipeKwargs(backend="cuda")
    with pytest.raises(ConfigurationError, match="amax_compute_algo='mean' is not valid"):
        FP8RecipeKwargs(amax_compute_algo="mean")
    with pytest.raises(
        ConfigurationError, match=r"override_linear_precision=\(True,\) must be three booleans"
    ):
        FP8RecipeKwargs(override_linear_precision=(True,))  # type: ignore[arg-type]


def test_profile_kwargs_write_a_real_trace(tmp_path: Path) -> None:
    handler = ProfileKwargs(
        activities=["cpu"],
        record_shapes=True,
        schedule_option={"wait": 0, "warmup": 1, "active": 2, "repeat": 1},
        output_trace_dir=str(tmp_path / "traces"),
    )
    assert handler.to_kwargs()["activities"] == ["cpu"]
    with handler.build() as profiler:
        for _ in range(3):
            torch.mm(torch.randn(16, 16), torch.randn(16, 16))
            profiler.step()
    path = handler.export_trace(profiler, process_index=0)
    assert path == str(tmp_path / "traces" / "profile_0.json")
    events = json.loads(Path(path).read_text())["traceEvents"]
    assert any("mm" in str(event.get("name", "")) for event in events)
    assert ProfileKwargs().export_trace(profiler) is None


def test_profile_kwargs_on_trace_ready_is_called() -> None:
    seen = []
    handler = ProfileKwargs(
        schedule_option={"wait": 0, "warmup": 1, "active": 1, "repeat": 1}, on_trace_ready=seen.append
    )
    with handler.build() as profiler:
        for _ in range(2):
            torch.ones(2).sum()
            profiler.step()
    assert seen == [profiler]


def test_profile_kwargs_validation() -> None:
    with pytest.raises(ConfigurationError, match=r"activities=\['gpu'\] has \['gpu'\]; each must be one of"):
        ProfileKwargs(activities=["gpu"])
    with pytest.raises(
        ConfigurationError, match=r"schedule_option has keys \['pause'\] that torch.profiler.schedule"
    ):
        ProfileKwargs(schedule_option={"pause": 1})
    with pytest.raises(ConfigurationError, match="with_flops=1 must be True or False"):
        ProfileKwargs(with_flops=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="activities has 'mtia', which this machine cannot profile"):
        ProfileKwargs(activities=["mtia"]).build()
