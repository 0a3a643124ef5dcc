"""LocalSGD on 2 gloo ranks: each rank steps on its own gradients, and every ``local_sgd_steps`` steps (and on
leaving the block) the weights become their mean, as computed by hand here."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.ranks import RankPool

STEPS, EVERY, LR = 5, 2, 0.1


def _inputs(rank: int, step: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 * rank + step))


def _fresh() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def _train(rank: int, net: nn.Module, optimizer: Any, backward: Any, step: int) -> None:
    backward(net(_inputs(rank, step)).square().mean())
    optimizer.step()
    optimizer.zero_grad()


def _by_hand(world: int) -> list[list[torch.Tensor]]:
    """Every rank's weights after each step, computed in one process."""
    replicas = [_fresh() for _ in range(world)]
    optimizers = [torch.optim.SGD(net.parameters(), lr=LR) for net in replicas]
    history = []
    for step in range(1, STEPS + 1):
        for rank, (net, optimizer) in enumerate(zip(replicas, optimizers)):
            _train(rank, net, optimizer, torch.Tensor.backward, step)
        if step % EVERY == 0:
            _average(replicas)
        history.append([net.weight.detach().clone() for net in replicas])
    _average(replicas)  # leaving the block
    history.append([net.weight.detach().clone() for net in replicas])
    return history


def _average(replicas: list[nn.Linear]) -> None:
    with torch.no_grad():
        for parameters in zip(*(net.parameters() for net in replicas)):
            mean = sum(parameters[1:], parameters[0].clone()) / len(parameters)
            for parameter in parameters:
                parameter.copy_(mean)


def _local_sgd() -> dict[str, Any]:
    from hasten import Accelerator
    from hasten.local_sgd import LocalSGD

    accelerator = Accelerator()
    net = _fresh()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    ddp, optimizer = accelerator.prepare(net, optimizer)
    weights = []
    with LocalSGD(accelerator, ddp, local_sgd_steps=EVERY) as local_sgd:
        for step in range(1, STEPS + 1):
            _train(accelerator.process_index, ddp, optimizer, accelerator.backward, step)
            local_sgd.step()
            weights.append(net.weight.detach().clone())
    weights.append(net.weight.detach().clone())
    return {"weights": weights, "enabled": local_sgd.enabled, "steps": local_sgd.num_steps}


def test_local_sgd_averages_every_k_steps_as_by_hand(ranks2: RankPool) -> None:
    results = ranks2.run(_local_sgd)
    expected = _by_hand(2)
    for rank, result in enumerate(results):
        assert result["enabled"] and result["steps"] == STEPS
        for step, weight in enumerate(result["weights"]):
            assert torch.equal(weight, expected[step][rank]), f"rank {rank}, after step {step + 1}"
    assert not torch.equal(results[0]["weights"][0], results[1]["weights"][0])  # apart between averages
    assert torch.equal(results[0]["weights"][-1], results[1]["weights"][-1])


def _refused_under_fsdp() -> str:
    from hasten import Accelerator
    from hasten.local_sgd import LocalSGD
    from hasten.utils import FullyShardedDataParallelPlugin

    accelerator = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    try:
        LocalSGD(accelerator, _fresh(), local_sgd_steps=2)
    except ValueError as error:
        return str(error)
    return ""


def test_local_sgd_refuses_sharded_engines(ranks2: RankPool) -> None:
    for message in ranks2.run(_refused_under_fsdp):
        assert "LocalSGD averages whole parameters, but this Accelerator runs FSDP" in message
