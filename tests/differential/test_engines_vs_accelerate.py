"""The same training script through hasten's and Accelerate's Accelerator with the FSDP2 and DeepSpeed
engines, on 2 gloo ranks: the same losses and final weights.

Accelerate does not run these engines on CPU processes as it does on GPUs: it ignores an FSDP plugin
there (its state keeps ``MULTI_CPU`` and wraps the model in DDP), and with DeepSpeed and no GPU it
counts one process (``num_processes == 1``) while DeepSpeed's group has two. So its state is given
what it would hold on GPUs, after construction (the FSDP type and plugin; the process count and
rank); everything else runs on its own code path.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.ranks import RankPool
from tests.training import train_prepared

pytest.importorskip("accelerate")

MICRO, STEPS = 4, 2


def _reset_both() -> None:
    from accelerate.state import AcceleratorState as TheirState
    from accelerate.state import GradientState as TheirGradients

    from hasten import AcceleratorState, GradientState

    TheirState._reset_state(reset_partial_state=True)
    TheirGradients._reset_state()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _accelerator(library: str, engine: str) -> Any:
    lib = importlib.import_module(library)
    utils = importlib.import_module(f"{library}.utils")
    if engine == "deepspeed":
        config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": 2},
        }
        plugin = utils.DeepSpeedPlugin(hf_ds_config=config)
        accelerator = lib.Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=STEPS)
        if library == "accelerate":
            for state in (lib.PartialState(), accelerator.state):
                state.num_processes = dist.get_world_size()
                state.process_index = state.local_process_index = dist.get_rank()
        return accelerator
    plugin = utils.FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = lib.Accelerator(cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=STEPS)
    if library == "accelerate":
        for state in (lib.PartialState(), accelerator.state):
            state.distributed_type = utils.DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def _run(library: str, engine: str) -> tuple[list[float], dict[str, torch.Tensor] | None, str]:
    accelerator = _accelerator(library, engine)
    net, losses, _, weights = train_prepared(accelerator)
    kind = type(net).__name__
    if engine == "deepspeed":
        accelerator.free_memory()
    return losses, None if not weights else {k: v.clone() for k, v in weights.items()}, kind


def _both(engine: str) -> dict[str, Any]:
    theirs = _run("accelerate", engine)
    _reset_both()
    ours = _run("hasten", engine)
    _reset_both()
    same_weights = None
    if ours[1] is not None and theirs[1] is not None:
        same_weights = ours[1].keys() == theirs[1].keys() and all(
            torch.equal(ours[1][k], theirs[1][k]) for k in ours[1]
        )
    return {
        "same losses": ours[0] == theirs[0],
        "same weights": same_weights,
        "kinds": (ours[2], theirs[2]),
        "losses": ours[0][:3],
    }


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_engines_train_like_accelerate(ranks2: RankPool, engine: str) -> None:
    pytest.importorskip("deepspeed") if engine == "deepspeed" else None
    results = ranks2.run(_both, engine, timeout=300)
    for rank, result in enumerate(results):
        assert result["same losses"], result
        assert result["kinds"][0] == result["kinds"][1], result["kinds"]
        if rank == 0 or engine == "deepspeed":  # ZeRO-2's state dict is whole on every rank
            assert result["same weights"], result
    assert results[0]["losses"] != results[1]["losses"]
