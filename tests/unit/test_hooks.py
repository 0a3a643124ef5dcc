"""Hooks around forward: add and remove exactly, chain, align devices, offload and restore."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

from hasten.hooks import (
    AlignDevicesHook,
    CpuOffload,
    ModelHook,
    SequentialHook,
    UserCpuOffloadHook,
    add_hook_to_module,
    attach_align_device_hook,
    attach_align_device_hook_on_blocks,
    attach_execution_device_hook,
    remove_hook_from_module,
    remove_hook_from_submodules,
)


class AddOne(ModelHook):
    def pre_forward(self, module, *args, **kwargs):  # type: ignore[no-untyped-def]
        return (args[0] + 1, *args[1:]), kwargs


class TimesTwo(ModelHook):
    def post_forward(self, module, output):  # type: ignore[no-untyped-def]
        return output * 2


class Counting(ModelHook):
    def __init__(self) -> None:
        self.events: list[str] = []

    def init_hook(self, module):  # type: ignore[no-untyped-def]
        self.events.append("init")
        return module

    def detach_hook(self, module):  # type: ignore[no-untyped-def]
        self.events.append("detach")
        return module


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.second = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.second(torch.relu(self.norm(self.first(x)))) * scale


def test_add_then_remove_restores_the_class_forward_exactly() -> None:
    layer = nn.Linear(2, 2)
    add_hook_to_module(layer, AddOne())
    assert "forward" in layer.__dict__ and hasattr(layer, "_hf_hook") and hasattr(layer, "_old_forward")
    remove_hook_from_module(layer)
    assert (
        "forward" not in layer.__dict__
        and not hasattr(layer, "_hf_hook")
        and not hasattr(layer, "_old_forward")
    )
    assert layer.forward.__func__ is nn.Linear.forward


def test_an_instance_forward_is_restored_as_it_was() -> None:
    layer = nn.Linear(2, 2)
    custom = lambda x: x * 3  # noqa: E731
    layer.forward = custom
    add_hook_to_module(layer, AddOne())
    assert torch.equal(layer(torch.ones(2)), torch.full((2,), 6.0))
    remove_hook_from_module(layer)
    assert layer.forward is custom


def test_hooks_change_inputs_and_outputs_and_keep_the_signature() -> None:
    model = Mlp().eval()
    x = torch.randn(2, 3)
    expected = model(x + 1) * 2
    add_hook_to_module(model, AddOne())
    add_hook_to_module(model, TimesTwo(), append=True)
    assert isinstance(model._hf_hook, SequentialHook)
    assert torch.allclose(model(x), expected)
    assert list(inspect.signature(model.forward).parameters) == ["x", "scale"]
    add_hook_to_module(model, TimesTwo())  # replaces the chain
    assert torch.allclose(model(x), Mlp.forward(model, x) * 2)


def test_replacing_detaches_the_old_hook_and_init_runs_once() -> None:
    layer = nn.Linear(2, 2)
    first, second = Counting(), Counting()
    add_hook_to_module(layer, first)
    add_hook_to_module(layer, second)
    assert first.events == ["init", "detach"] and second.events == ["init"]
    remove_hook_from_module(layer)
    assert second.events == ["init", "detach"]


def test_no_grad_hooks() -> None:
    class NoGrad(ModelHook):
        no_grad = True

    layer = nn.Linear(2, 2)
    add_hook_to_module(layer, NoGrad())
    assert not layer(torch.ones(2)).requires_grad


def test_hooked_modules_pickle_and_deepcopy() -> None:
    model = Mlp().eval()
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True))
    x = torch.randn(2, 3)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), model(x))
    assert torch.equal(copy.deepcopy(model)(x), model(x))


def test_remove_recursively() -> None:
    model = Mlp()
    attach_execution_device_hook(model, "cpu")
    hooked = [name for name, module in model.named_modules() if hasattr(module, "_hf_hook")]
    assert hooked == ["", "first", "norm", "second"]
    remove_hook_from_submodules(model)
    assert not any(hasattr(module, "_hf_hook") or "forward" in module.__dict__ for module in model.modules())


def test_preload_classes_get_one_hook_for_their_subtree() -> None:
    model = nn.Sequential(Mlp(), nn.Linear(5, 2))
    attach_execution_device_hook(model, "cpu", preload_module_classes=["Mlp"])
    assert hasattr(model[0], "_hf_hook") and not hasattr(model[0].first, "_hf_hook")


def _offloaded_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.device.type == "meta"}


def test_offload_hook_loads_weights_only_during_forward_and_restores_on_detach() -> None:
    model = Mlp().eval()
    x = torch.randn(3, 3)
    expected = model(x)
    original = {name: t.clone() for name, t in model.state_dict().items()}
    attach_align_device_hook(model, execution_device="cpu", offload=True)
    assert _offloaded_names(model) == {name for name, _ in model.named_parameters()}
    assert model.norm.running_mean.device.type == "cpu"  # buffers stay unless offload_buffers
    seen = {}
    inner = model.second._old_forward

    def spy(*args: torch.Tensor) -> torch.Tensor:  # runs inside the hook, where the weights are loaded
        seen["device"] = model.second.weight.device.type
        return inner(*args)

    model.second._old_forward = spy
    assert torch.allclose(model(x), expected)
    model.second._old_forward = inner
    assert seen["device"] == "cpu" and _offloaded_names(model) == {n for n, _ in model.named_parameters()}
    remove_hook_from_submodules(model)
    assert all(torch.equal(t, original[name]) for name, t in model.state_dict().items())


def test_offload_buffers_too() -> None:
    model = Mlp().eval()
    attach_align_device_hook(model, execution_device="cpu", offload=True, offload_buffers=True)
    assert model.norm.running_mean.device.type == "meta"
    assert model(torch.randn(2, 3)).shape == (2, 5)


def test_align_hook_repr() -> None:
    hook = AlignDevicesHook(execution_device="cpu", skip_keys="cache")
    assert repr(hook).startswith("AlignDevicesHook(execution_device=cpu") and "skip_keys='cache'" in repr(
        hook
    )


class Recorder(nn.Module):
    """Records the device of each input it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, str] = {}

    def forward(self, x: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen = {"x": x.device.type, "cache": cache.device.type, "mask": mask.device.type}
        return x


@pytest.mark.parametrize(
    ("skip_keys", "kept"), [("cache", {"cache"}), (["cache", "mask"], {"cache", "mask"}), (None, set())]
)
def test_skip_keys_are_not_moved_to_the_execution_device(
    skip_keys: str | list[str] | None, kept: set[str]
) -> None:
    module = Recorder()
    add_hook_to_module(module, AlignDevicesHook(execution_device="meta", skip_keys=skip_keys))
    module(torch.ones(2), cache=torch.zeros(2), mask=torch.ones(2))
    assert module.seen == {name: "cpu" if name in kept else "meta" for name in ("x", "cache", "mask")}


def test_blocks_dispatch_with_mixed_offload() -> None:
    seq = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)).eval()
    x = torch.randn(2, 3)
    expected = seq(x)
    weights = {name: t.clone() for name, t in seq.state_dict().items()}
    attach_align_device_hook_on_blocks(
        seq,
        execution_device={"0": "cpu", "1": "cpu", "2": "cpu"},
        offload={"0": False, "1": True, "2": False},
        weights_map=weights,
    )
    assert seq[1].weight.device.type == "meta" and seq[0].weight.device.type == "cpu"
    assert hasattr(seq, "_hf_hook") and seq._hf_hook.io_same_device
    assert torch.allclose(seq(x), expected)


def test_cpu_offload_hook_and_user_handle() -> None:
    model = Mlp().eval()
    hook = CpuOffload(execution_device="cpu")
    add_hook_to_module(model, hook)
    handle = UserCpuOffloadHook(model, hook)
    x = torch.randn(2, 3)
    assert model(x).shape == (2, 5)
    handle.offload()
    handle.remove()
    assert not hasattr(model, "_hf_hook")
