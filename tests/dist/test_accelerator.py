"""The Accelerator on real gloo groups of 2 and 4 ranks: DDP, accumulation, equivalence with a loop
written by hand, collectives, uneven inputs, saving."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.training import library_run, raw_run, same_run

POOLS = ["ranks2", "ranks4"]


def _reset() -> None:
    from hasten import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _equivalent(steps: int, precision: str) -> tuple[bool, list[float]]:
    raw = raw_run(steps, precision)
    _reset()
    ours = library_run("hasten", steps, precision)
    return same_run(raw, ours), ours[0][:4]


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("steps", [1, 4])
def test_training_matches_ddp_written_by_hand_bit_for_bit(
    pool: str, steps: int, request: pytest.FixtureRequest
) -> None:
    results = request.getfixturevalue(pool).run(_equivalent, steps, "no")
    assert all(same for same, _ in results), results
    assert results[0][1] != results[1][1]  # each rank saw its own batches


@pytest.mark.parametrize("pool", POOLS)
def test_bf16_training_matches_autocast_written_by_hand(pool: str, request: pytest.FixtureRequest) -> None:
    results = request.getfixturevalue(pool).run(_equivalent, 4, "bf16")
    assert all(same for same, _ in results), results


def _ddp_parts(**kwargs: Any) -> tuple[Any, nn.Module, Any]:
    from hasten import Accelerator

    accelerator = Accelerator(**kwargs)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return accelerator, model, optimizer


def _wraps_with_ddp_and_refuses_twice() -> dict[str, Any]:
    from hasten.utils import DistributedDataParallelKwargs
    from hasten.utils.errors import ConfigurationError

    handler = DistributedDataParallelKwargs(bucket_cap_mb=1, comm_hook="fp16")
    accelerator, model, optimizer = _ddp_parts(kwargs_handlers=[handler])
    ddp, optimizer = accelerator.prepare(model, optimizer)
    try:
        accelerator.prepare(model)
        twice = ""
    except ConfigurationError as error:
        twice = str(error)
    rank = accelerator.process_index
    accelerator.backward(ddp(torch.full((2, 4), float(rank))).sum())
    optimizer.step()
    weights = accelerator.gather(accelerator.unwrap_model(ddp).weight.detach()[None])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    return {
        "type": type(ddp).__name__,
        "bucket": ddp.bucket_bytes_cap,
        "hook": ddp._get_ddp_logging_data().get("comm_hook"),
        "twice": twice,
        "same weights": all(torch.equal(w, weights[0]) for w in weights),
        "unwrapped": accelerator.unwrap_model(ddp) is model,
        "evaluation": type(accelerator.prepare_model(nn.Linear(2, 2), evaluation_mode=True)).__name__,
        "frozen": type(accelerator.prepare(frozen)).__name__,
    }


@pytest.mark.parametrize("pool", POOLS)
def test_models_are_wrapped_in_ddp_with_the_handler(pool: str, request: pytest.FixtureRequest) -> None:
    for result in request.getfixturevalue(pool).run(_wraps_with_ddp_and_refuses_twice):
        assert result["type"] == "DistributedDataParallel" and result["bucket"] == 1024 * 1024
        assert result["hook"] == "fp16_compress_hook"
        assert "Linear was prepared already, as a DistributedDataParallel" in result["twice"]
        assert result["same weights"] and result["unwrapped"]
        assert result["evaluation"] == "Linear" and result["frozen"] == "Linear"


def _grad_spread(model: nn.Module) -> float:
    from hasten.utils import gather

    grads = gather(model.weight.grad[None])
    return float((grads - grads[0]).abs().max())


def _no_sync_then_trigger() -> list[float]:
    accelerator, model, optimizer = _ddp_parts()
    ddp, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    x = torch.full((2, 4), float(rank + 1))
    with accelerator.no_sync(ddp):
        first = ddp(x).sum()
        second = ddp(x * 2).sum()
    accelerator.backward(first)
    spread_local = _grad_spread(model)
    with accelerator.trigger_sync_in_backward(ddp):
        accelerator.backward(second)
    return [spread_local, _grad_spread(model)]


def test_no_sync_and_trigger_sync_in_backward(ranks2: Any) -> None:
    for local, synced in ranks2.run(_no_sync_then_trigger):
        assert local > 0 and synced == 0


def _accumulation_pattern(sync_each_batch: bool) -> list[float]:
    from hasten.utils import GradientAccumulationPlugin

    plugin = GradientAccumulationPlugin(num_steps=2, sync_each_batch=sync_each_batch)
    accelerator, model, optimizer = _ddp_parts(gradient_accumulation_plugin=plugin)
    ddp, optimizer = accelerator.prepare(model, optimizer)
    spreads = []
    for step in range(2):
        with accelerator.accumulate(ddp):
            accelerator.backward(ddp(torch.full((2, 4), float(accelerator.process_index + step))).sum())
            spreads.append(_grad_spread(model))
    return spreads


def test_accumulate_skips_the_all_reduce_unless_sync_each_batch(ranks2: Any) -> None:
    for first, second in ranks2.run(_accumulation_pattern, False):
        assert first > 0 and second == 0
    for first, second in ranks2.run(_accumulation_pattern, True):
        assert first == 0 and second == 0


def _collectives() -> dict[str, Any]:
    from hasten import Accelerator

    accelerator = Accelerator()
    rank = accelerator.process_index
    if rank == 1:
        accelerator.set_trigger()
    padded = accelerator.pad_across_processes(torch.arange(rank + 1), pad_index=-1)
    return {
        "trigger": accelerator.check_trigger(),
        "again": accelerator.check_trigger(),
        "sum": accelerator.reduce(torch.tensor([rank + 1.0])).item(),
        "padded": padded.tolist(),
        "gathered": accelerator.gather_for_metrics(torch.tensor([rank])).tolist(),
        "objects": accelerator.gather_for_metrics([f"rank {rank}"]),
        "forced": accelerator.gather_for_metrics([rank], use_gather_object=True),
    }


@pytest.mark.parametrize("pool", POOLS)
def test_collectives_and_triggers(pool: str, request: pytest.FixtureRequest) -> None:
    ranks = request.getfixturevalue(pool)
    n = ranks.world_size
    for rank, result in enumerate(ranks.run(_collectives)):
        assert result["trigger"] and not result["again"]
        assert result["sum"] == n * (n + 1) / 2
        assert result["padded"] == list(range(rank + 1)) + [-1] * (n - rank - 1)
        assert result["gathered"] == list(range(n)) == result["forced"]
        assert result["objects"] == [f"rank {r}" for r in range(n)]


def _uneven(even_batches: bool | None) -> int:
    accelerator, model, optimizer = _ddp_parts()
    ddp, optimizer = accelerator.prepare(model, optimizer)
    batches = 3 + accelerator.process_index  # rank 1 has one batch more
    with accelerator.join_uneven_inputs([ddp], even_batches=even_batches):
        for _ in range(batches):
            accelerator.backward(ddp(torch.ones(2, 4)).sum())
            optimizer.step()
            optimizer.zero_grad()
    return batches


def _join_refuses_models_ddp_did_not_wrap() -> str:
    accelerator, model, _ = _ddp_parts()
    try:
        with accelerator.join_uneven_inputs([model]):
            pass
    except TypeError as error:
        return str(error)
    return ""


def test_join_uneven_inputs(ranks2: Any) -> None:
    assert ranks2.run(_uneven, False, timeout=60) == [3, 4]
    messages = ranks2.run(_join_refuses_models_ddp_did_not_wrap)
    assert all("joinables[0] is a Linear, not a Joinable" in message for message in messages)


def _scheduler_steps(split_batches: bool) -> int:
    from hasten.utils import DataLoaderConfiguration

    accelerator, model, optimizer = _ddp_parts(
        dataloader_config=DataLoaderConfiguration(split_batches=split_batches)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ddp, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.backward(ddp(torch.ones(1, 4)).sum())
    optimizer.step()
    scheduler.step()
    return int(scheduler.scheduler.last_epoch)


@pytest.mark.parametrize("pool", POOLS)
def test_the_scheduler_steps_once_per_process(pool: str, request: pytest.FixtureRequest) -> None:
    ranks = request.getfixturevalue(pool)
    assert ranks.run(_scheduler_steps, False) == [ranks.world_size] * ranks.world_size
    assert ranks.run(_scheduler_steps, True) == [1] * ranks.world_size


def _device_map(bypass: bool) -> str:
    from hasten.utils import patch_environment

    accelerator, model, _ = _ddp_parts()
    model.hf_device_map = {"a": "cpu", "b": "disk"}
    with patch_environment(ACCELERATE_BYPASS_DEVICE_MAP="true" if bypass else ""):
        _reset()
        accelerator, _, _ = _ddp_parts()
        try:
            return type(accelerator.prepare(model)).__name__
        except ValueError as error:
            return str(error)


def test_a_dispatched_model_cannot_train_on_several_processes(ranks2: Any) -> None:
    assert all("dispatched across devices" in message for message in ranks2.run(_device_map, False))
    assert ranks2.run(_device_map, True) == ["DistributedDataParallel"] * 2


def _save(folder: str) -> list[str]:
    from hasten import load_checkpoint_in_model

    accelerator, model, _ = _ddp_parts(mixed_precision="bf16")
    ddp = accelerator.prepare(model)
    accelerator.save_model(ddp, folder, max_shard_size=32)
    accelerator.wait_for_everyone()
    twin = nn.Linear(4, 2)
    load_checkpoint_in_model(twin, folder)
    assert torch.equal(twin.weight, model.weight)
    return sorted(os.listdir(folder))


def test_save_model_writes_from_the_main_process(ranks2: Any, tmp_path: Path) -> None:
    results = ranks2.run(_save, str(tmp_path))
    assert (
        results[0]
        == results[1]
        == [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]
    )


def _free() -> list[bool]:
    accelerator, model, optimizer = _ddp_parts(mixed_precision="bf16")
    ddp, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(ddp(torch.ones(1, 4)).sum())
    references = [weakref.ref(ddp), weakref.ref(model), weakref.ref(optimizer)]
    del model
    ddp, optimizer = accelerator.free_memory(ddp, optimizer)
    return [reference() is None for reference in references]


def test_free_memory_releases_ddp_models(ranks2: Any) -> None:
    assert ranks2.run(_free) == [[True, True, True]] * 2


def _compiled_unwrap() -> list[str]:
    accelerator, model, _ = _ddp_parts(dynamo_backend="eager")
    compiled = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(compiled)
    return [type(compiled._orig_mod).__name__, type(unwrapped).__name__, type(unwrapped._orig_mod).__name__]


def test_unwrapping_a_compiled_ddp_model_leaves_it_whole(ranks2: Any) -> None:
    assert ranks2.run(_compiled_unwrap) == [["DistributedDataParallel", "OptimizedModule", "Linear"]] * 2


def _equivalent_with_prepared_loaders(steps: int) -> bool:
    raw = raw_run(steps, whole_batches=True)
    _reset()
    return same_run(raw, library_run("hasten", steps, prepare_loader=True))


@pytest.mark.parametrize("pool", POOLS)
def test_prepared_loaders_shard_and_sync_at_their_end_like_the_loop_by_hand(
    pool: str, request: pytest.FixtureRequest
) -> None:
    assert all(request.getfixturevalue(pool).run(_equivalent_with_prepared_loaders, 4))  # 6 batches on 4 ranks


def _metrics(rows: int) -> tuple[list[int], list[str]]:
    from hasten import Accelerator

    accelerator = Accelerator()
    data = torch.utils.data.TensorDataset(torch.arange(rows))
    loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=2))
    seen: list[int] = []
    names: list[str] = []
    for (batch,) in loader:
        seen += accelerator.gather_for_metrics(batch).tolist()
        names += accelerator.gather_for_metrics([f"row {int(i)}" for i in batch])
    return seen, names


@pytest.mark.parametrize("pool", POOLS)
def test_gather_for_metrics_drops_the_repeated_samples(pool: str, request: pytest.FixtureRequest) -> None:
    for seen, names in request.getfixturevalue(pool).run(_metrics, 9):
        assert sorted(seen) == list(range(9)) and len(seen) == 9
        assert sorted(names) == sorted(f"row {i}" for i in range(9))


def _uneven_loaders() -> tuple[int, bool]:
    accelerator, model, optimizer = _ddp_parts()
    data = torch.utils.data.TensorDataset(torch.ones(6, 4))
    ddp, optimizer, loader = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=2))
    batches = 0
    with accelerator.join_uneven_inputs([ddp], even_batches=False):
        for (x,) in loader:
            accelerator.backward(ddp(x).sum())
            optimizer.step()
            optimizer.zero_grad()
            batches += 1
    return batches, loader.batch_sampler.even_batches


def test_join_with_prepared_loaders_of_uneven_length(ranks2: Any) -> None:
    assert ranks2.run(_uneven_loaders, timeout=60) == [(2, True), (1, True)]


def _sharded_model() -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from hasten.utils.errors import ConfigurationError

    accelerator, model, _ = _ddp_parts()
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Replicate()]))
    try:
        accelerator.prepare(model)
    except ConfigurationError as error:
        return str(error)
    return ""


def test_ddp_refuses_a_model_with_dtensor_parameters(ranks2: Any) -> None:
    assert all("Linear holds DTensor parameters" in message for message in ranks2.run(_sharded_model))
