"""Kwargs handlers and plugins driving the real engines on 2 gloo ranks: DDP with a comm hook, FSDP2 training
and state dicts, the process group formed from InitProcessGroupKwargs, and deepspeed.initialize on CPU."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.ranks import RankPool, run_on_ranks

# --- DistributedDataParallelKwargs ----------------------------------------------------------------

GRADS = (1 / 3, 1 / 7)  # what each rank's loss gives as the gradient of its single weight


def _ddp_gradient(hook: str) -> float | str:
    from hasten.utils.dataclasses import DistributedDataParallelKwargs
    from hasten.utils.errors import ConfigurationError

    handler = DistributedDataParallelKwargs(comm_hook=hook, broadcast_buffers=False)
    model = torch.nn.Linear(1, 1, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **handler.to_kwargs())
    try:
        handler.register_comm_hook(ddp)
    except ConfigurationError as error:
        return str(error)
    ddp(torch.tensor([[GRADS[dist.get_rank()]]])).sum().backward()
    return float(model.weight.grad.item())  # type: ignore[union-attr]


def test_ddp_comm_hook_changes_what_is_communicated(ranks2: RankPool) -> None:
    plain = ranks2.run(_ddp_gradient, "no")
    fp16 = ranks2.run(_ddp_gradient, "fp16")
    exact = sum(torch.tensor(g, dtype=torch.float32) for g in GRADS) / 2
    assert plain == [pytest.approx(exact.item(), abs=0)] * 2

    def compressed(dtype: torch.dtype) -> float:  # what the compression hook computes: cast, divide, sum, cast back
        parts = [torch.tensor(g).to(dtype).div(2) for g in GRADS]
        return float((parts[0] + parts[1]).float().item())

    assert fp16 == [compressed(torch.float16)] * 2 and fp16[0] != exact.item()


def test_ddp_bf16_compression_on_gloo_says_what_it_needs(ranks2: RankPool) -> None:
    """torch's bf16 hooks run only on NCCL (CUDA) or XCCL (XPU); on gloo the handler says so and suggests fp16."""
    for message in ranks2.run(_ddp_gradient, "bf16"):
        assert "needs NCCL on CUDA or XCCL on XPU, but the model's process group uses 'gloo'" in str(message)


def _power_sgd_rank() -> list[int]:
    from hasten.utils.dataclasses import DistributedDataParallelKwargs

    handler = DistributedDataParallelKwargs(
        comm_hook="power_sgd",
        comm_state_option={"matrix_approximation_rank": 1, "start_powerSGD_iter": 2, "min_compression_rate": 0.1},
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **handler.to_kwargs())
    handler.register_comm_hook(ddp)
    torch.manual_seed(1 + dist.get_rank())
    ranks = []
    for _ in range(3):
        model.zero_grad()
        ddp(torch.randn(32, 16)).square().sum().backward()
        ranks.append(int(torch.linalg.matrix_rank(model.weight.grad)))  # type: ignore[arg-type]
    return ranks


def test_power_sgd_state_options_reach_the_hook(ranks2: RankPool) -> None:
    """Plain all-reduce before start_powerSGD_iter, then gradients compressed to matrix_approximation_rank."""
    for ranks in ranks2.run(_power_sgd_rank):
        assert ranks == [16, 16, 1]


# --- FullyShardedDataParallelPlugin (FSDP2) -------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(2)])
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(8, 8, generator=generator), torch.randn(8, 1, generator=generator)


def _reference_step() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Model()
    inputs, targets = _batches()
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _fsdp2_train_and_save(folder: str, activation_checkpointing: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    from hasten.utils.dataclasses import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"],
        state_dict_type="FULL_STATE_DICT", activation_checkpointing=activation_checkpointing,
    )
    torch.manual_seed(0)
    model = plugin.wrap(Model())
    sharded_blocks = [isinstance(m, FSDPModule) for m in model.modules()]
    rank = dist.get_rank()
    inputs, targets = _batches()
    rows = slice(4 * rank, 4 * rank + 4)  # each rank trains on its half of the batch
    torch.nn.functional.mse_loss(model(inputs[rows]), targets[rows]).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    local_shape = tuple(model.head.weight.to_local().shape)  # type: ignore[operator]
    full = get_model_state_dict(model, options=plugin.state_dict_options())
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(folder, "model.safetensors"))
    import torch.distributed.checkpoint as dcp

    plugin.set_state_dict_type("SHARDED_STATE_DICT")
    sharded = get_model_state_dict(model, options=plugin.state_dict_options())
    dcp.save(sharded, checkpoint_id=os.path.join(folder, "sharded"))
    return {
        "full": {k: v.clone() for k, v in full.items()},
        "sharded_is_dtensor": all(type(v).__name__ == "DTensor" for v in sharded.values()),
        "wrapped": sharded_blocks.count(True),
        "local_head_shape": local_shape,
        "output": model(inputs).detach(),
    }


def _fsdp2_load(folder: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from hasten.utils.dataclasses import FullyShardedDataParallelPlugin

    inputs, _ = _batches()
    outputs = {}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    # from the full state dict, read on rank 0 and broadcast
    torch.manual_seed(99)
    model = plugin.wrap(Model())
    full = load_file(os.path.join(folder, "model.safetensors")) if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    outputs["from_full"] = model(inputs).detach()
    # from the sharded checkpoint
    torch.manual_seed(98)
    model = plugin.wrap(Model())
    sharded = get_model_state_dict(model, options=plugin.state_dict_options())
    dcp.load(sharded, checkpoint_id=os.path.join(folder, "sharded"))
    set_model_state_dict(model, sharded, options=plugin.state_dict_options())
    outputs["from_sharded"] = model(inputs).detach()
    return outputs


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_fsdp2_training_step_and_state_dicts(ranks2: RankPool, tmp_path: Path, activation_checkpointing: bool) -> None:
    results = ranks2.run(_fsdp2_train_and_save, str(tmp_path), activation_checkpointing)
    reference = _reference_step()
    for result in results:
        assert result["wrapped"] == 3  # the two Blocks (by class name) and the root
        assert result["local_head_shape"] == (1, 8) or result["local_head_shape"] == (0, 8)  # head sharded on dim 0
        assert result["sharded_is_dtensor"]
    full = results[0]["full"]
    assert set(full) == set(reference)
    for key, value in reference.items():
        assert torch.allclose(full[key], value, atol=1e-6), key  # one sharded step == one step on the whole batch
    loaded = ranks2.run(_fsdp2_load, str(tmp_path))
    for rank_output, rank_loaded in zip(results, loaded):
        assert torch.allclose(rank_loaded["from_full"], rank_output["output"], atol=1e-6)
        assert torch.allclose(rank_loaded["from_sharded"], rank_output["output"], atol=1e-6)


def _fsdp1_on_cpu() -> str:
    from hasten.utils.dataclasses import FullyShardedDataParallelPlugin
    from hasten.utils.errors import ConfigurationError

    try:
        FullyShardedDataParallelPlugin(fsdp_version=1).wrap(Model())
    except ConfigurationError as error:
        return str(error)
    return "wrapped"


def test_fsdp1_on_a_cpu_only_machine_says_to_use_fsdp2(ranks2: RankPool) -> None:
    """torch's FullyShardedDataParallel refuses to run without an accelerator; the plugin says so first."""
    for message in ranks2.run(_fsdp1_on_cpu):
        assert "fsdp_version=1 (FullyShardedDataParallel) needs an accelerator" in message
        assert "use fsdp_version=2 (fully_shard)" in message


# --- InitProcessGroupKwargs -----------------------------------------------------------------------


def _join_with_handler() -> tuple[str | None, float, int]:
    from hasten.state import PartialState
    from hasten.utils.dataclasses import InitProcessGroupKwargs

    handler = InitProcessGroupKwargs(backend="gloo", timeout=datetime.timedelta(seconds=42))
    state = PartialState(**handler.to_kwargs())
    return state.backend, state.timeout.total_seconds(), state.num_processes


def test_init_process_group_kwargs_form_the_group() -> None:
    assert run_on_ranks(_join_with_handler, 2, timeout=90) == [("gloo", 42.0, 2)] * 2


# --- DeepSpeedPlugin ------------------------------------------------------------------------------


def _deepspeed_step(zero_stage: int) -> dict[str, Any]:
    import deepspeed

    from hasten.utils.dataclasses import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=zero_stage, gradient_clipping=1.0, gradient_accumulation_steps=1)
    plugin.deepspeed_config_process(must_match=True, train_micro_batch_size_per_gpu=4, train_batch_size=8)
    plugin.deepspeed_config["zero_allow_untested_optimizer"] = True  # plain SGD, which ZeRO has not certified
    torch.manual_seed(0)
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=plugin.deepspeed_config)
    inputs, targets = _batches()
    rows = slice(4 * dist.get_rank(), 4 * dist.get_rank() + 4)
    engine.backward(torch.nn.functional.mse_loss(engine(inputs[rows]), targets[rows]))
    engine.step()
    return {
        "stage": engine.zero_optimization_stage(),
        "clipping": engine.gradient_clipping(),
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
        "head": model.head.weight.detach().clone(),
    }


def test_deepspeed_initialize_runs_a_zero2_step_on_cpu(ranks2: RankPool) -> None:
    from hasten.utils.imports import is_deepspeed_available

    if not is_deepspeed_available():
        pytest.skip("deepspeed is not installed")
    results = ranks2.run(_deepspeed_step, 2, timeout=300)
    for result in results:
        assert (result["stage"], result["clipping"], result["micro_batch"]) == (2, 1.0, 4)
    assert torch.equal(results[0]["head"], results[1]["head"])  # ranks agree after the ZeRO step
    torch.manual_seed(0)
    assert not torch.equal(results[0]["head"], Model().head.weight.detach())  # and the step moved the weights
