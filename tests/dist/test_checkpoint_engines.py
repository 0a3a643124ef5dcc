"""save_state / load_state on 2 real gloo ranks with each engine: DDP, FSDP2 (sharded and full state
dicts, through ``hasten.utils.fsdp_checkpoint``) and DeepSpeed (its engine's own checkpoint).

Each run trains a few steps, saves, records the next steps' losses, then a fresh ``Accelerator``
(new model, other seed) loads the state and must produce the same losses; a rank whose RNG file is
missing makes every rank raise before anything is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional

from tests.ranks import RankPool, raised
from tests.training import _optimizer, model, raw_loader


def _reset() -> None:
    from hasten import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _accelerator(engine: str) -> Any:
    from hasten import Accelerator
    from hasten.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    if engine == "ddp":
        return Accelerator()
    if engine.startswith("fsdp2"):
        kind = "FULL_STATE_DICT" if engine.endswith("full") else "SHARDED_STATE_DICT"
        return Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=kind))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "train_batch_size": "auto",
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
    }
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))


def _steps(accelerator: Any, net: Any, optimizer: Any, scheduler: Any, batches: list[Any]) -> list[float]:
    losses = []
    for x, y in batches:
        with accelerator.accumulate(net):
            loss = functional.cross_entropy(net(x), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _prepared(engine: str, seed: int) -> tuple[Any, Any, Any, Any]:
    accelerator = _accelerator(engine)
    net = model()  # seeded inside: the same start on every rank
    optimizer, scheduler = _optimizer(net.parameters())
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    torch.manual_seed(seed)
    return accelerator, net, optimizer, scheduler


def save_and_resume(engine: str, folder: str) -> dict[str, Any]:
    accelerator, net, optimizer, scheduler = _prepared(engine, seed=0)
    batches = list(raw_loader(accelerator.num_processes, accelerator.process_index))
    _steps(accelerator, net, optimizer, scheduler, batches[:4])
    accelerator.save_state(folder)
    expected = _steps(accelerator, net, optimizer, scheduler, batches[4:8])
    files = sorted(os.listdir(folder))
    accelerator.free_memory()
    _reset()

    accelerator, net, optimizer, scheduler = _prepared(engine, seed=1)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(0.5)  # make sure the weights come from the checkpoint
    accelerator.load_state(folder)
    resumed = _steps(accelerator, net, optimizer, scheduler, batches[4:8])
    if accelerator.process_index == 1:
        os.remove(Path(folder) / "random_states_1.pkl")
    accelerator.wait_for_everyone()
    missing = raised(lambda: accelerator.load_state(folder))
    engine_errors = _engine_errors(accelerator, engine, Path(folder).parent)
    accelerator.free_memory()
    return {"same": resumed == expected, "files": files, "missing": missing, **engine_errors}


def _engine_errors(accelerator: Any, engine: str, root: Path) -> dict[str, str]:
    """What the engine's own checkpoint code refuses, called as save_state / load_state call it."""
    import shutil

    from torch import nn

    bare = accelerator._engine
    if engine == "fsdp2-sharded":
        optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters())
        return {"no model": raised(lambda: bare.save_checkpoint(root / "x", [], [optimizer], {}))}
    if engine != "deepspeed":
        return {}
    folder = root / "without-deepspeed-files"
    accelerator.save_state(folder)
    if accelerator.is_main_process:
        shutil.rmtree(folder / "pytorch_model")
        (folder / "latest").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return {
        "no checkpoint": raised(lambda: accelerator.load_state(folder)),
        "not deepspeed": raised(lambda: bare.save_checkpoint(root, [nn.Linear(2, 2)], [], {})),
    }


@pytest.mark.parametrize(
    ("engine", "expected_files"),
    [
        ("ddp", {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"}),
        ("fsdp2-sharded", {"pytorch_model_fsdp_0", "optimizer_0", "scheduler.bin", "random_states_1.pkl"}),
        ("fsdp2-full", {"pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.bin"}),
    ],
)
def test_save_and_resume_on_two_ranks(
    engine: str, expected_files: set[str], tmp_path: Path, ranks2: RankPool
) -> None:
    results = ranks2.run(save_and_resume, engine, str(tmp_path / "state"))
    for rank, result in enumerate(results):
        assert result["same"], f"rank {rank}: the resumed losses differ"
        assert expected_files <= set(result["files"]), result["files"]
    if engine == "fsdp2-sharded":
        assert all("no model is prepared" in result["no model"] for result in results)
    assert "Process 1 could not load its part" in results[0]["missing"]  # every rank raises, none hangs
    assert "random_states_1.pkl is missing" in results[0]["missing"]
    assert results[1]["missing"].startswith("CheckpointError: ")
    assert "random_states_1.pkl is missing" in results[1]["missing"]


def test_deepspeed_checkpoint_on_two_ranks(tmp_path: Path, ranks2: RankPool) -> None:
    pytest.importorskip("deepspeed")
    results = ranks2.run(save_and_resume, "deepspeed", str(tmp_path / "state"))
    for result in results:
        assert result["same"]
        assert {"pytorch_model", "scheduler.bin", "random_states_0.pkl"} <= set(result["files"])
        assert "random_states_1.pkl is missing" in result["missing"]
        assert "pytorch_model is missing: DeepSpeed has no checkpoint" in result["no checkpoint"]
        assert "Model 0 (Linear) was not prepared by DeepSpeed" in result["not deepspeed"]
