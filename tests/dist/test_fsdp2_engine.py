"""The Accelerator's FSDP2 engine on real gloo ranks: the same training as ``fully_shard`` written by hand
(bit for bit) and as DDP (within fp32 tolerance), sharded parameters in the optimizer, no_sync, clipping,
full and sharded state dicts, mixed precision, activation checkpointing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional

from tests.ranks import raised
from tests.training import _optimizer, accelerated_epochs, model, raw_loader, raw_run


def _reset() -> None:
    from hasten import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _plugin(**kwargs: Any) -> Any:
    from hasten.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, **kwargs)


def _raw_fully_shard_run(steps: int, epochs: int = 2) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The loop written by hand with ``fully_shard``: gradient sync off while accumulating."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    world, rank = dist.get_world_size(), dist.get_rank()
    net = model()
    fully_shard(net)
    optimizer, scheduler = _optimizer(net.parameters())
    losses, count = [], 0
    for _ in range(epochs):
        for x, y in raw_loader(world, rank):
            count += 1
            sync = count % steps == 0
            net.set_requires_gradient_sync(sync)
            loss = functional.cross_entropy(net(x), y)
            (loss / steps if steps > 1 else loss).backward()
            if sync:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                optimizer.step()
                for _ in range(world):
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return losses, get_model_state_dict(net, options=options)


def _accelerator_run(steps: int, epochs: int = 2, **plugin: Any) -> tuple[list[float], Any, dict[str, Any]]:
    from torch.distributed.tensor import DTensor

    from hasten import Accelerator

    accelerator = Accelerator(fsdp_plugin=_plugin(**plugin), gradient_accumulation_steps=steps)
    net = model()
    optimizer, scheduler = _optimizer(net.parameters())
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    facts = {
        "engine": repr(accelerator),
        "fsdp2": accelerator.is_fsdp2,
        "optimizer holds shards": all(isinstance(p, DTensor) for p in optimizer.param_groups[0]["params"]),
        "same objects": [id(p) for p in optimizer.param_groups[0]["params"]]
        == [id(p) for p in net.parameters()],
        "unwrapped": accelerator.unwrap_model(net) is net,
    }
    loader = raw_loader(accelerator.num_processes, accelerator.process_index)
    losses, norms = accelerated_epochs(accelerator, net, optimizer, scheduler, loader, epochs)
    facts["norm types"] = {type(norm).__name__ for norm in norms}
    return losses, accelerator.get_state_dict(net), facts


def _equivalence(steps: int) -> dict[str, Any]:
    ours, ours_weights, facts = _accelerator_run(steps)
    _reset()
    raw, raw_weights = _raw_fully_shard_run(steps)
    _reset()
    ddp, ddp_weights = raw_run(steps)
    same_weights = (
        None
        if ours_weights is None
        else all(torch.equal(ours_weights[k], raw_weights[k]) for k in raw_weights)
    )
    close_weights = None
    if ours_weights is not None:
        close_weights = all(
            torch.allclose(ours_weights[k], ddp_weights[k], rtol=1e-4, atol=1e-5) for k in ddp_weights
        )
    return {
        **facts,
        "same as fully_shard": ours == raw,
        "same weights": same_weights,
        "close to DDP": all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(ours, ddp)),
        "close weights": close_weights,
        "state dict keys": None if ours_weights is None else sorted(ours_weights),
        "losses": ours[:3],
    }


@pytest.mark.parametrize(("pool", "steps"), [("ranks2", 1), ("ranks2", 3), ("ranks4", 3)])
def test_fsdp2_training_matches_fully_shard_by_hand_and_ddp(
    pool: str, steps: int, request: pytest.FixtureRequest
) -> None:
    results = request.getfixturevalue(pool).run(_equivalence, steps)
    for rank, result in enumerate(results):
        assert "engine='FSDP2'" in result["engine"] and result["fsdp2"]
        assert result["optimizer holds shards"] and result["same objects"] and result["unwrapped"]
        assert result["norm types"] == {"Tensor"}  # a plain tensor, not a DTensor
        assert result["same as fully_shard"], result
        assert result["close to DDP"], result
        if rank == 0:  # the full state dict is gathered on the main process only
            assert result["same weights"] and result["close weights"]
            assert result["state dict keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        else:
            assert result["same weights"] is None
    assert results[0]["losses"] != results[1]["losses"]  # each rank trained on its own batches


def _no_sync_and_clipping() -> dict[str, Any]:

    from hasten import Accelerator

    accelerator = Accelerator(fsdp_plugin=_plugin(), dynamo_backend="eager")  # compiled after sharding
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net, optimizer = accelerator.prepare(net, optimizer)
    compiled = (type(net).__name__, type(accelerator.unwrap_model(net, keep_torch_compile=False)).__name__)
    x = torch.full((2, 4), float(accelerator.process_index + 1))
    with accelerator.no_sync(net):
        accelerator.backward(net(x).sum())
    nothing_reduced = net.weight.grad is None  # kept unsharded inside FSDP until a synchronising backward
    accelerator.backward(net(x).sum())
    accumulated = net.weight.grad.full_tensor()
    optimizer.zero_grad()
    accelerator.backward(net(x).sum())
    grad = net.weight.grad.full_tensor()
    expected_norm = torch.cat([grad.flatten(), net.bias.grad.full_tensor().flatten()]).norm()
    norm = accelerator.clip_grad_norm_(net.parameters(), 0.5)
    clipped = torch.cat(
        [net.weight.grad.full_tensor().flatten(), net.bias.grad.full_tensor().flatten()]
    ).norm()
    accelerator.clip_grad_value_(net.parameters(), 0.01)
    largest = max(float(p.grad.full_tensor().abs().max()) for p in net.parameters())
    return {
        "compiled": compiled,
        "nothing reduced": nothing_reduced,
        "accumulated twice": torch.allclose(accumulated, 2 * grad),
        "synced grad": grad.tolist(),
        "norm": float(norm),
        "expected norm": float(expected_norm),
        "clipped norm": float(clipped),
        "largest after value clip": largest,
    }


def test_no_sync_keeps_gradients_local_and_clipping_sees_every_shard(ranks2: Any) -> None:
    results = ranks2.run(_no_sync_and_clipping)
    for result in results:
        assert result["compiled"] == ("OptimizedModule", "FSDPLinear")
        assert result["nothing reduced"] and result["accumulated twice"]
        assert result["norm"] == pytest.approx(result["expected norm"], rel=1e-6)
        assert result["clipped norm"] == pytest.approx(0.5, rel=1e-5)
        assert result["largest after value clip"] <= 0.01 + 1e-7
    assert results[0]["synced grad"] == results[1]["synced grad"]  # reduced over both ranks
    assert results[0]["norm"] == results[1]["norm"]


def _separate_calls_and_refusals() -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from hasten import Accelerator

    accelerator = Accelerator(fsdp_plugin=_plugin())
    first = model()
    early = torch.optim.SGD(first.parameters(), lr=0.1)  # built on the whole parameters, prepared later
    first = accelerator.prepare(first)
    early = accelerator.prepare(early)
    switched = all(isinstance(p, DTensor) for p in early.param_groups[0]["params"])
    second = model()
    stepped = torch.optim.SGD(second.parameters(), lr=0.1, momentum=0.9)
    second(torch.ones(1, 8)).sum().backward()
    stepped.step()  # state shaped like the whole parameters
    second = accelerator.prepare(second)
    try:
        accelerator.prepare(stepped)
        refused = ""
    except ValueError as error:
        refused = str(error)
    evaluation = accelerator.prepare_model(model(), evaluation_mode=True)
    from hasten.utils import DeepSpeedPlugin

    return {
        "switched": switched,
        "refused": refused,
        "evaluation sharded": any(isinstance(p, DTensor) for p in evaluation.parameters()),
        "second": Accelerator().is_fsdp2,
        "second, same plugin": Accelerator(fsdp_plugin=_plugin()).is_fsdp2,
        "second, other plugin": raised(lambda: Accelerator(fsdp_plugin=_plugin(reshard_after_forward=False))),
        "second, deepspeed": raised(lambda: Accelerator(deepspeed_plugin=DeepSpeedPlugin())),
        "untied": raised(lambda: _tied_model(accelerator)),
    }


class _Tied(nn.Module):
    """A model whose ``tie_weights`` ties its head to its embedding, as transformers models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)

    def tie_weights(self) -> None:
        self.head.weight = self.embed.weight


def _tied_model(accelerator: Any) -> None:
    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = True  # re-ties after loading rank 0's weights
    try:
        accelerator.prepare(_Tied())
    finally:
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False


def test_optimizer_prepared_after_its_model_gets_the_shards(ranks2: Any) -> None:
    for result in ranks2.run(_separate_calls_and_refusals):
        assert result["switched"]
        assert "already has optimizer state" in result["refused"]
        assert result["evaluation sharded"] is False
        assert result["second"] and result["second, same plugin"]
        assert "a second Accelerator asked for" in result["second, other plugin"]
        assert "deepspeed_plugin=None; a second Accelerator asked for" in result["second, deepspeed"]
        assert "no longer has the parameters ['head.weight']" in result["untied"]


def _save_full_and_sharded(folder: str) -> dict[str, Any]:
    from hasten import Accelerator
    from hasten.utils import load_checkpoint_in_model
    from hasten.utils.fsdp_utils import load_fsdp_model, save_fsdp_model

    plugin = _plugin(state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(fsdp_plugin=plugin)
    net = model()
    optimizer, _ = _optimizer(net.parameters())
    net, optimizer = accelerator.prepare(net, optimizer)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(accelerator.process_index))
    accelerator.backward(net(x).square().mean())
    optimizer.step()
    expected = net(torch.ones(2, 8)).detach()
    accelerator.save_model(net, os.path.join(folder, "full"), max_shard_size=300)
    save_fsdp_model(plugin, accelerator, net, os.path.join(folder, "sharded"))
    accelerator.wait_for_everyone()
    whole = model()
    load_checkpoint_in_model(whole, os.path.join(folder, "full"))
    for parameter in net.parameters():
        parameter.data.zero_()
    load_fsdp_model(plugin, accelerator, net, os.path.join(folder, "sharded"))
    return {
        "from full": torch.allclose(whole(torch.ones(2, 8)), expected, atol=1e-6),
        "from sharded": torch.equal(net(torch.ones(2, 8)).detach(), expected),
        "files": sorted(os.listdir(os.path.join(folder, "full"))),
    }


def test_full_model_files_and_sharded_checkpoints(ranks2: Any, tmp_path: Path) -> None:
    for result in ranks2.run(_save_full_and_sharded, str(tmp_path)):
        assert result["from full"] and result["from sharded"]
        assert "model.safetensors.index.json" in result["files"]


def _bf16_and_checkpointing() -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule

    from hasten import Accelerator

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.linear(x))

    plugin = _plugin(
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
        activation_checkpointing=True,
    )
    accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16")
    torch.manual_seed(0)
    net = nn.Sequential(Block(), Block(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net, optimizer = accelerator.prepare(net, optimizer)
    out = net(torch.ones(3, 8))
    accelerator.backward(out.float().sum())
    optimizer.step()
    return {
        "policy": str(plugin.mixed_precision_policy.param_dtype),
        "output": str(out.dtype),
        "master weights": {str(p.dtype) for p in net.parameters()},
        "sharded groups": sum(isinstance(m, FSDPModule) for m in net.modules()),
        "checkpointed": sum("CheckpointWrapper" in type(m).__name__ for m in net.modules()),
        "keys": sorted(accelerator.get_state_dict(net) or {}),
    }


def test_bf16_policy_and_activation_checkpointing(ranks2: Any) -> None:
    results = ranks2.run(_bf16_and_checkpointing)
    for result in results:
        assert result["policy"] == "torch.bfloat16" and result["output"] == "torch.bfloat16"
        assert result["master weights"] == {"torch.float32"}
        assert result["sharded groups"] == 3 and result["checkpointed"] == 2
    assert results[0]["keys"] == [
        "0.linear.bias",
        "0.linear.weight",
        "1.linear.bias",
        "1.linear.weight",
        "2.bias",
        "2.weight",
    ]
