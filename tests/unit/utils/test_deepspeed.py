"""hasten.utils.deepspeed on one process: the placeholders, the wrappers' no-op steps, the active plugin,
DeepSpeed's CPU optimizers, and the errors when deepspeed is missing."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from hasten import Accelerator, AcceleratorState
from hasten.utils import (
    DeepSpeedEngineWrapper,
    DeepSpeedOptimizerWrapper,
    DeepSpeedPlugin,
    DeepSpeedSchedulerWrapper,
    DummyOptim,
    DummyScheduler,
    get_active_deepspeed_plugin,
    map_pytorch_optim_to_deepspeed,
)
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import package_version


@pytest.fixture
def without_deepspeed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """deepspeed made unimportable for the test, as if it were not installed."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # type: ignore[arg-type]
    package_version.cache_clear()
    yield
    monkeypatch.undo()
    package_version.cache_clear()


def test_placeholders_keep_what_they_are_given() -> None:
    parameters = [torch.nn.Parameter(torch.ones(2))]
    optimizer = DummyOptim(parameters, lr=0.1, betas=(0.8, 0.9))
    assert (optimizer.params, optimizer.lr, optimizer.weight_decay, optimizer.kwargs) == (
        parameters,
        0.1,
        0,
        {"betas": (0.8, 0.9)},
    )
    scheduler = DummyScheduler(optimizer, total_num_steps=10, lr_scheduler_callable=print, gamma=0.5)
    assert scheduler.optimizer is optimizer and scheduler.total_num_steps == 10
    assert scheduler.warmup_num_steps == 0 and scheduler.lr_scheduler_callable is print
    assert scheduler.kwargs == {"gamma": 0.5}


def test_prepared_optimizer_and_scheduler_leave_stepping_to_the_engine() -> None:
    Accelerator()
    parameter = torch.nn.Parameter(torch.ones(2))
    parameter.grad = torch.ones(2)
    inner = torch.optim.SGD([parameter], lr=1.0)
    wrapped = DeepSpeedOptimizerWrapper(inner)
    wrapped.step()
    wrapped.zero_grad()
    assert torch.equal(parameter.detach(), torch.ones(2)) and parameter.grad is not None
    assert wrapped.step_was_skipped is False
    inner.overflow = True  # type: ignore[attr-defined]  what DeepSpeed's fp16 optimizers report
    assert DeepSpeedOptimizerWrapper(inner).step_was_skipped is True
    scheduler = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    DeepSpeedSchedulerWrapper(scheduler, wrapped).step()
    assert scheduler.get_last_lr() == [1.0]


def test_active_plugin_needs_deepspeed() -> None:
    state = Accelerator().state
    with pytest.raises(ConfigurationError, match="There is no active DeepSpeed plugin: the state runs NO"):
        get_active_deepspeed_plugin(state)
    with pytest.raises(
        ConfigurationError, match="No DeepSpeed plugin is named 'train'; the Accelerator was given"
    ):
        AcceleratorState().select_deepspeed_plugin("train")


def test_missing_deepspeed_is_named_on_use(without_deepspeed: None) -> None:
    from hasten.utils import is_deepspeed_available

    assert not is_deepspeed_available()
    hint = r"pip install 'hasten\[deepspeed\]'"
    with pytest.raises(ImportError, match=hint):
        DeepSpeedEngineWrapper(object())
    with pytest.raises(ImportError, match=hint):
        map_pytorch_optim_to_deepspeed(torch.optim.Adam([torch.nn.Parameter(torch.ones(1))]))
    with pytest.raises(ImportError, match=r"The DeepSpeed engine \(deepspeed_plugin\) needs .*" + hint):
        Accelerator(deepspeed_plugin=DeepSpeedPlugin())


def test_moe_leaf_modules_are_found_by_class_name() -> None:
    pytest.importorskip("deepspeed")

    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Experts())
    DeepSpeedPlugin(zero_stage=3, transformer_moe_cls_names="Experts").set_moe_leaf_modules(model)
    assert getattr(model[1], "_z3_leaf", False) and not getattr(model[0], "_z3_leaf", False)
    DeepSpeedPlugin(zero_stage=3).set_moe_leaf_modules(model[0])  # nothing named: nothing to do
    with pytest.raises(ConfigurationError, match=r"names \['Router'\], which the model does not contain"):
        DeepSpeedPlugin(zero_stage=3, transformer_moe_cls_names="Experts, Router").set_moe_leaf_modules(model)


def _built(op: str) -> bool:
    """Whether DeepSpeed's CPU op was compiled on this machine already (compiling takes minutes)."""
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.exists(os.path.join(_get_build_directory(op, False), f"{op}.so"))


def _bnb(name: str) -> Any:
    def build(parameters: Any, **kwargs: Any) -> Any:
        import bitsandbytes.optim

        return getattr(bitsandbytes.optim, name)(parameters, optim_bits=32, **kwargs)

    return build


@pytest.mark.parametrize(
    ("optimizer", "op", "expected", "adamw_mode"),
    [
        (torch.optim.Adam, "cpu_adam", "DeepSpeedCPUAdam", False),
        (torch.optim.AdamW, "cpu_adam", "DeepSpeedCPUAdam", True),
        (_bnb("AdamW"), "cpu_adam", "DeepSpeedCPUAdam", True),
        (torch.optim.Adagrad, "cpu_adagrad", "DeepSpeedCPUAdagrad", None),
        (_bnb("Lion"), "cpu_lion", "DeepSpeedCPULion", None),
    ],
)
def test_torch_optimizers_map_to_deepspeeds_cpu_optimizers(
    optimizer: Any, op: str, expected: str, adamw_mode: bool | None
) -> None:
    pytest.importorskip("deepspeed")
    if not _built(op):
        pytest.skip(f"DeepSpeed's {op} op is not compiled here (build it once: see docs/testing.md)")
    model = torch.nn.Linear(3, 2)
    mapped = map_pytorch_optim_to_deepspeed(optimizer(model.parameters(), lr=0.25, weight_decay=0.5))
    assert type(mapped).__name__ == expected
    assert mapped.param_groups[0]["lr"] == 0.25 and mapped.param_groups[0]["weight_decay"] == 0.5
    assert [p for group in mapped.param_groups for p in group["params"]] == list(model.parameters())
    if adamw_mode is not None:
        assert mapped.adam_w_mode is adamw_mode
