"""init_empty_weights / init_on_device: models on meta without allocating, scoped to the block."""

from __future__ import annotations

import time

import psutil
import pytest
import torch
from torch import nn

from hasten.big_modeling import init_empty_weights, init_on_device
from hasten.utils.environment import patch_environment


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("inv_freq", torch.arange(3.0) / 3)


class Flagged(nn.Parameter):
    """A parameter subclass (as quantization libraries define)."""


def test_parameters_on_meta_buffers_real_with_their_values() -> None:
    with init_empty_weights():
        model = WithBuffer()
    assert model.linear.weight.device.type == "meta" and isinstance(model.linear.weight, nn.Parameter)
    assert model.inv_freq.device.type == "cpu" and torch.equal(model.inv_freq, torch.arange(3.0) / 3)
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # the hook is gone after the block


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_include_buffers_puts_everything_on_meta(how: str) -> None:
    if how == "argument":
        with init_empty_weights(include_buffers=True):
            model = WithBuffer()
    else:
        with patch_environment(ACCELERATE_INIT_INCLUDE_BUFFERS="1"), init_empty_weights():
            model = WithBuffer()
    assert model.inv_freq.device.type == "meta" and model.linear.weight.device.type == "meta"
    assert torch.empty(1).device.type == "cpu"


def test_parameter_classes_and_requires_grad_survive() -> None:
    with init_empty_weights():
        module = nn.Module()
        module.flag = Flagged(torch.ones(2), requires_grad=False)
    assert type(module.flag) is Flagged and not module.flag.requires_grad and module.flag.is_meta


def test_init_on_device_cpu_and_exceptions_still_clean_up() -> None:
    with init_on_device("cpu"):
        assert nn.Linear(2, 2).weight.device.type == "cpu"
    with pytest.raises(RuntimeError, match="boom"), init_empty_weights():
        raise RuntimeError("boom")
    assert nn.Linear(2, 2).weight.device.type == "cpu"


def test_a_model_far_larger_than_memory_builds_in_moments() -> None:
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with init_empty_weights(include_buffers=True):
        model = nn.Sequential(*(nn.Linear(32768, 32768) for _ in range(64)))  # 275 GB in float32
    assert time.perf_counter() - start < 10
    assert psutil.Process().memory_info().rss - before < 200 * 2**20
    assert sum(p.numel() for p in model.parameters()) > 6 * 10**10
