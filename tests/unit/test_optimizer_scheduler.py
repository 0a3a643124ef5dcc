"""AcceleratedOptimizer and AcceleratedScheduler on their own: skipping while accumulating, the gradient
scaler's skipped steps, zero_grad, pickling, and the scheduler following the optimizer."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from torch import nn

from hasten import GradientState
from hasten.optimizer import AcceleratedOptimizer
from hasten.scheduler import AcceleratedScheduler


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _backward(model: nn.Module, scaler: torch.amp.GradScaler | None = None) -> None:
    loss = model(torch.ones(4, 3)).sum()
    (loss if scaler is None else scaler.scale(loss)).backward()


def test_steps_and_zero_grad_only_when_gradients_sync() -> None:
    model = _model()
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    _backward(model)
    GradientState()._set_sync_gradients(False)
    optimizer.step()
    optimizer.zero_grad()
    assert torch.equal(model.weight, before) and model.weight.grad is not None
    GradientState()._set_sync_gradients(True)
    optimizer.step()
    assert not torch.equal(model.weight, before)
    optimizer.zero_grad(set_to_none=False)
    assert model.weight.grad is not None and not model.weight.grad.any()
    optimizer.zero_grad()
    assert model.weight.grad is None


def test_the_grad_scaler_skips_steps_with_infinite_gradients() -> None:
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    before = model.weight.detach().clone()
    _backward(model, scaler)
    model.weight.grad[0, 0] = float("inf")
    optimizer.step()
    assert optimizer.step_was_skipped and torch.equal(model.weight, before)
    assert scaler.get_scale() == 2.0**7  # backed off
    assert "step" not in optimizer.optimizer.__dict__  # the counting step was removed again
    optimizer.zero_grad()
    _backward(model, scaler)
    optimizer.step()
    assert not optimizer.step_was_skipped and not torch.equal(model.weight, before)


def test_scaled_step_with_a_closure_and_an_instance_step() -> None:
    model = _model()
    scaler = torch.amp.GradScaler("cpu")
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(inner, step_size=1)  # wraps inner.step on the instance
    wrapped_step = inner.__dict__["step"]
    optimizer = AcceleratedOptimizer(inner, scaler=scaler)
    _backward(model, scaler)

    def closure() -> torch.Tensor:
        return torch.tensor(1.5)

    assert optimizer.step(closure).item() == 1.5
    assert inner.__dict__["step"] is wrapped_step and not optimizer.step_was_skipped


class _NoSetToNone(torch.optim.SGD):
    def zero_grad(self) -> None:  # type: ignore[override]
        super().zero_grad(set_to_none=True)


def test_zero_grad_of_an_optimizer_without_set_to_none() -> None:
    model = _model()
    optimizer = AcceleratedOptimizer(_NoSetToNone(model.parameters(), lr=0.1))
    _backward(model)
    optimizer.zero_grad()
    assert model.weight.grad is None
    with pytest.raises(ValueError, match=r"_NoSetToNone.zero_grad takes no set_to_none argument"):
        optimizer.zero_grad(set_to_none=False)


def test_pickles_with_its_scaler_and_state() -> None:
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=100)
    optimizer = AcceleratedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), scaler=scaler)
    _backward(model, scaler)
    optimizer.step()
    copy = pickle.loads(pickle.dumps(optimizer))
    assert isinstance(copy, AcceleratedOptimizer) and copy.scaler.get_scale() == 4.0
    assert copy.state_dict()["state"][0]["step"].item() == 1.0
    assert copy.param_groups[0]["lr"] == 0.1 and not copy.step_was_skipped


def test_delegates_to_the_wrapped_optimizer() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = AcceleratedOptimizer(inner)
    assert optimizer.param_groups is inner.param_groups and optimizer.defaults is inner.defaults
    assert optimizer.state is inner.state and "SGD" in repr(optimizer)
    extra = nn.Parameter(torch.ones(2))
    optimizer.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[1]["lr"] == 0.5
    optimizer.param_groups = inner.param_groups[:1]
    optimizer.defaults = dict(inner.defaults, lr=0.2)
    optimizer.state = inner.state
    assert len(inner.param_groups) == 1 and inner.defaults["lr"] == 0.2
    state = optimizer.state_dict()
    optimizer.load_state_dict(state)
    replacement = nn.Parameter(torch.zeros(2, 3))
    optimizer._switch_parameters({model.weight: replacement})
    assert inner.param_groups[0]["params"][0] is replacement


class _ScheduleFree(torch.optim.SGD):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.modes: list[str] = []

    def train(self) -> None:
        self.modes.append("train")

    def eval(self) -> None:
        self.modes.append("eval")


def test_train_and_eval_reach_optimizers_that_have_them() -> None:
    inner = _ScheduleFree(_model().parameters(), lr=0.1)
    optimizer = AcceleratedOptimizer(inner)
    optimizer.eval()
    optimizer.train()
    assert inner.modes == ["eval", "train"]
    plain = AcceleratedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
    plain.train()  # nothing to do
    plain.eval()
    nested = AcceleratedOptimizer(optimizer)  # type: ignore[arg-type]
    nested.train()
    assert inner.modes[-1] == "train"


def _scheduled(
    step_with_optimizer: bool = True, scaler: torch.amp.GradScaler | None = None
) -> tuple[AcceleratedOptimizer, Any, AcceleratedScheduler]:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    optimizer = AcceleratedOptimizer(inner, scaler=scaler)
    _backward(model, scaler)
    return optimizer, scheduler, AcceleratedScheduler(scheduler, optimizer, step_with_optimizer)


def test_the_scheduler_follows_the_optimizer() -> None:
    optimizer, scheduler, wrapped = _scheduled()
    GradientState()._set_sync_gradients(False)
    optimizer.step()
    wrapped.step()
    assert wrapped.get_last_lr() == [1.0]
    GradientState().plugin_kwargs["adjust_scheduler"] = True
    wrapped.step()
    assert scheduler._step_count == 2 and wrapped.get_last_lr() == [1.0]  # counted, not stepped
    GradientState()._set_sync_gradients(True)
    optimizer.step()
    wrapped.step()
    assert wrapped.get_last_lr() == [0.5]
    with pytest.warns(UserWarning, match="get_last_lr"):  # torch's own advice, passed through
        assert wrapped.get_lr() == [0.25]
    state = wrapped.state_dict()
    wrapped.step()
    wrapped.load_state_dict(state)
    assert wrapped.get_last_lr() == [0.5] and "StepLR" in repr(wrapped)


def test_a_scheduler_not_stepped_with_the_optimizer_steps_on_every_call() -> None:
    optimizer, _, wrapped = _scheduled(step_with_optimizer=False)
    optimizer.step()
    wrapped.step()
    GradientState()._set_sync_gradients(False)  # even while accumulating
    wrapped.step()
    assert wrapped.get_last_lr() == [0.25]


def test_the_scheduler_waits_when_the_scaler_skipped() -> None:
    scaler = torch.amp.GradScaler("cpu")
    optimizer, _, wrapped = _scheduled(scaler=scaler)
    optimizer.optimizer.param_groups[0]["params"][0].grad[0, 0] = float("nan")
    optimizer.step()
    wrapped.step()
    assert optimizer.step_was_skipped and wrapped.get_last_lr() == [1.0]


def test_one_cycle_stops_at_its_total_steps() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(inner, max_lr=1.0, total_steps=3)
    optimizer = AcceleratedOptimizer(inner)
    wrapped = AcceleratedScheduler(scheduler, [optimizer], split_batches=True)
    for _ in range(5):
        _backward(model)
        optimizer.step()
        wrapped.step()  # OneCycleLR raises past its total; the wrapper stops first
    assert scheduler._step_count == 4


def test_fp16_precision_scales_the_loss_and_unscales_before_clipping() -> None:
    """The fp16 path with a real gradient scaler (torch's CPU GradScaler; fp16 itself needs an
    accelerator, so the precision is built for a CUDA device that this test never computes on)."""
    from hasten.engines.precision import Precision
    from hasten.utils import DistributedType, GradScalerKwargs, PrecisionType

    precision = Precision(
        PrecisionType.FP16,
        torch.device("cuda", 0),
        DistributedType.NO,
        scaler_handler=GradScalerKwargs(init_scale=1024.0),
    )
    assert precision.native_amp and precision.scaler is not None
    model = _model()
    twin = _model()
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler=precision.scaler)
    precision.backward(model(torch.ones(4, 3)).sum())
    twin(torch.ones(4, 3)).sum().backward()
    assert torch.equal(model.weight.grad, twin.weight.grad * 1024)
    precision.unscale([optimizer])
    assert torch.equal(model.weight.grad, twin.weight.grad)
    optimizer.step()
    assert not optimizer.step_was_skipped


def test_move_to_device_keeps_the_structure() -> None:
    from hasten.optimizer import move_to_device

    moved = move_to_device({"a": [torch.ones(1), (torch.zeros(2), 3)]}, "cpu")
    assert (
        type(moved["a"][1]) is tuple and moved["a"][1][1] == 3 and torch.equal(moved["a"][0], torch.ones(1))
    )
