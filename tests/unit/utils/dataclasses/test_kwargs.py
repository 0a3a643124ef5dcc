"""Kwargs handlers: to_kwargs against declared defaults, validation, and the engines they drive on one process."""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hasten.state import AcceleratorState
from hasten.utils.amp import get_grad_scaler, get_mixed_precision_context_manager
from hasten.utils.dataclasses.enums import DDPCommunicationHookType
from hasten.utils.dataclasses.kwargs import (
    AutocastKwargs,
    DistributedDataParallelKwargs,
    FP8RecipeKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    ProfileKwargs,
)
from hasten.utils.environment import patch_environment

CORPUS = [
    (AutocastKwargs, {"cache_enabled": True}),
    (AutocastKwargs, {}),
    (GradScalerKwargs, {"init_scale": 1024.0, "growth_interval": 10}),
    (InitProcessGroupKwargs, {"backend": "gloo", "timeout": datetime.timedelta(seconds=30)}),
    (DistributedDataParallelKwargs, {"find_unused_parameters": True, "bucket_cap_mb": 50, "comm_hook": "fp16"}),
    (FP8RecipeKwargs, {"backend": "TE", "margin": 1, "fp8_format": "HYBRID"}),
    (ProfileKwargs, {"activities": ["cpu"], "record_shapes": True}),
]


@pytest.mark.parametrize(("cls", "settings"), CORPUS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CORPUS)])
def test_to_kwargs_returns_only_changed_fields_like_accelerate(cls: type, settings: dict) -> None:
    ours = cls(**settings).to_kwargs()
    assert set(ours) <= set(settings)
    accelerate = pytest.importorskip("accelerate.utils")
    if cls is FP8RecipeKwargs:
        return  # Accelerate's needs the FP8 engine installed to build one; hasten's only validates the choice
    if cls is DistributedDataParallelKwargs:
        settings = {**settings, "comm_hook": accelerate.DDPCommunicationHookType(settings["comm_hook"])}
    with patch_environment(accelerate_mixed_precision="no"):
        theirs = getattr(accelerate, cls.__name__)(**settings).to_kwargs()
    assert ours == theirs


def test_environment_does_not_change_to_kwargs() -> None:
    with patch_environment(ACCELERATE_MIXED_PRECISION="bf16", ACCELERATE_DYNAMO_BACKEND="INDUCTOR"):
        assert AutocastKwargs(enabled=False).to_kwargs() == {"enabled": False}


def test_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"timeout='soon' must be a datetime.timedelta"):
        InitProcessGroupKwargs(timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"backend='tcp' is not a torch.distributed backend"):
        InitProcessGroupKwargs(backend="tcp")
    assert InitProcessGroupKwargs(timeout=5).timeout == datetime.timedelta(seconds=5)
    with pytest.raises(ValueError, match=r"comm_wrapper='power_sgd' must be one of \['no', 'fp16', 'bf16'\]"):
        DistributedDataParallelKwargs(comm_wrapper="power_sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"comm_hook"):
        DistributedDataParallelKwargs(comm_hook="zip")  # type: ignore[arg-type]
    assert DistributedDataParallelKwargs(comm_hook="bf16").comm_hook is DDPCommunicationHookType.BF16  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"backend"):
        FP8RecipeKwargs(backend="cuda")
    with pytest.raises(ValueError, match=r"fp8_format='E3M4' must be one of"):
        FP8RecipeKwargs(fp8_format="E3M4")
    with pytest.raises(ValueError, match=r"activities contains 'gpu'; the choices are"):
        ProfileKwargs(activities=["gpu"])


def test_ddp_kwargs_leave_hook_fields_out_of_ddp_arguments() -> None:
    kwargs = DistributedDataParallelKwargs(comm_hook="power_sgd", comm_state_option={"matrix_approximation_rank": 2})  # type: ignore[arg-type]
    assert set(kwargs.to_dict()) == {f.name for f in dataclasses.fields(kwargs)} - {"comm_hook", "comm_wrapper",
                                                                                     "comm_state_option"}  # fmt: skip


def test_autocast_runs_matmuls_in_bf16_on_cpu() -> None:
    AcceleratorState(mixed_precision="bf16", cpu=True)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with get_mixed_precision_context_manager(native_amp=True, autocast_kwargs=AutocastKwargs(cache_enabled=False)):
        assert (a @ b).dtype == torch.bfloat16
    with get_mixed_precision_context_manager(native_amp=True, autocast_kwargs=AutocastKwargs(enabled=False)):
        assert (a @ b).dtype == torch.float32
    with get_mixed_precision_context_manager(native_amp=False):
        assert (a @ b).dtype == torch.float32


def test_grad_scaler_from_kwargs_scales_and_steps() -> None:
    AcceleratorState(cpu=True)
    scaler = get_grad_scaler(**GradScalerKwargs(init_scale=1024.0).to_kwargs())
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    loss = (weight * 2).sum()
    scaled = scaler.scale(loss)
    assert scaled.item() == pytest.approx(loss.item() * 1024)
    scaled.backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.allclose(weight.detach(), torch.full((3,), 0.8))


PROFILE = """
import sys, torch
from hasten.utils.dataclasses.kwargs import ProfileKwargs
kwargs = ProfileKwargs(activities=["cpu"], schedule_option={"wait": 0, "warmup": 0, "active": 1},
                       output_trace_dir=sys.argv[1], record_shapes=True)
with kwargs.build() as profiler:
    for _ in range(3):
        torch.randn(8, 8) @ torch.randn(8, 8)
        profiler.step()
"""


def test_profile_kwargs_write_a_real_trace(tmp_path: Path) -> None:
    # In a fresh interpreter: torch 2.13's profiler crashes inside pytest's process here (not outside it).
    result = subprocess.run([sys.executable, "-c", PROFILE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    traces = sorted(tmp_path.glob("trace_rank0_step*.json"))
    assert traces and all(json.loads(trace.read_text())["traceEvents"] for trace in traces)
    assert any("aten::mm" in trace.read_text() for trace in traces)
