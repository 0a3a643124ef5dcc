"""Kwargs handlers driving real engines on gloo ranks: a DDP communication hook, process-group settings."""

from __future__ import annotations

import datetime

import pytest

from tests.ranks import run_on_ranks


def _ddp_with_hook(hook: str) -> list[float]:
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from hasten.state import PartialState
    from hasten.utils.dataclasses.kwargs import DistributedDataParallelKwargs

    state = PartialState()
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    kwargs = DistributedDataParallelKwargs(comm_hook=hook)  # type: ignore[arg-type]
    ddp = DistributedDataParallel(model, **kwargs.to_kwargs())
    kwargs.register_comm_hook(ddp)
    # gradients with more precision than fp16 keeps: each rank's differs
    inputs = torch.full((1, 4), 1.0 + 1e-4 * (state.process_index + 1) + 1 / 3)
    ddp(inputs).sum().backward()
    return model.weight.grad.tolist()[0]


def test_fp16_comm_hook_compresses_the_gradient_all_reduce(ranks2) -> None:
    plain = ranks2.run(_ddp_with_hook, "no")
    compressed = ranks2.run(_ddp_with_hook, "fp16")
    assert plain[0] == plain[1] and compressed[0] == compressed[1]
    import torch

    exact, reduced = torch.tensor(plain[0]), torch.tensor(compressed[0])
    assert not torch.equal(reduced, exact) and torch.allclose(reduced, exact, rtol=1e-3)
    assert torch.equal(reduced.half().float(), reduced)  # the all-reduce travelled in fp16


def _join_with(seconds: float) -> tuple[str, float]:
    import torch.distributed as dist

    from hasten.state import PartialState, _group_timeout
    from hasten.utils.dataclasses.kwargs import InitProcessGroupKwargs

    kwargs = InitProcessGroupKwargs(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
    PartialState(**kwargs.to_kwargs())
    return dist.get_backend(), _group_timeout().total_seconds()


@pytest.mark.parametrize("world", [2])
def test_init_process_group_kwargs_reach_the_group(world: int) -> None:
    assert run_on_ranks(_join_with, world, 42.0, timeout=120) == [("gloo", 42.0)] * world
