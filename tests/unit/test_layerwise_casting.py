"""Layerwise casting: weights stored low, each compute layer upcast only for its own forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from hasten.big_modeling import attach_layerwise_casting_hooks, cpu_offload
from hasten.hooks import LayerwiseCastingHook, SequentialHook, remove_hook_from_submodules


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.proj(x))
        return self.head(self.conv(h.unsqueeze(1)).flatten(1))


class _WeightDtypes(TorchFunctionMode):
    """Records the dtype of the weight each linear / convolution call computes with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (F.linear, F.conv1d):
            self.seen.append((func.__name__, args[1].dtype))
        return func(*args, **kwargs)


def test_weights_are_stored_low_and_computed_high() -> None:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 8)
    reference = model(x)
    attach_layerwise_casting_hooks(model, storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    stored = {name: p.dtype for name, p in model.named_parameters()}
    assert stored["proj.weight"] == stored["conv.weight"] == stored["head.0.weight"] == torch.bfloat16
    assert stored["norm.weight"] == torch.float32  # not a compute layer: untouched
    with _WeightDtypes() as during:
        output = model(x)
    assert during.seen == [
        ("linear", torch.float32),
        ("conv1d", torch.float32),
        ("linear", torch.float32),
    ]
    assert model.proj.weight.dtype == torch.bfloat16  # back to storage after the call
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, reference, atol=0.05, rtol=0.05)  # bf16 storage rounding only
    assert isinstance(model.proj._hf_hook, LayerwiseCastingHook)


def test_float8_storage() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    attach_layerwise_casting_hooks(model, torch.float8_e4m3fn, torch.bfloat16)
    assert model[0].weight.dtype == torch.float8_e4m3fn
    assert model(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_skipping_by_pattern_and_class() -> None:
    model = Net()
    attach_layerwise_casting_hooks(
        model, torch.bfloat16, torch.float32, skip_modules_pattern="^head", skip_modules_classes=(nn.Conv1d,)
    )
    assert model.proj.weight.dtype == torch.bfloat16
    assert model.head[0].weight.dtype == model.conv.weight.dtype == torch.float32
    other = Net()
    attach_layerwise_casting_hooks(
        other, torch.bfloat16, torch.float32, skip_modules_pattern=["proj", "conv"]
    )
    assert other.proj.weight.dtype == other.conv.weight.dtype == torch.float32
    assert other.head[0].weight.dtype == torch.bfloat16


def test_casting_chains_after_an_offloading_hook() -> None:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 8)
    reference = model(x)
    cpu_offload(model, execution_device="cpu")
    attach_layerwise_casting_hooks(model, torch.bfloat16, torch.float32)
    assert isinstance(model.proj._hf_hook, SequentialHook)
    torch.testing.assert_close(model(x), reference, atol=0.05, rtol=0.05)
    remove_hook_from_submodules(model)


def test_bad_dtypes_are_named() -> None:
    with pytest.raises(TypeError, match=r"storage_dtype=torch.int8 must be a floating torch.dtype"):
        attach_layerwise_casting_hooks(nn.Linear(2, 2), torch.int8, torch.float32)
    with pytest.raises(TypeError, match=r"compute_dtype='bf16' must be a floating torch.dtype"):
        LayerwiseCastingHook(torch.bfloat16, "bf16", False)  # type: ignore[arg-type]
