"""The FSDP2 and DeepSpeed engines and LocalSGD against Accelerate, on 2 gloo ranks (never run by the tests).

Run: ``.venv/bin/python bench/bench_engines.py`` (needs Accelerate and deepspeed; 2 processes on
127.0.0.1). Three measurements, contenders interleaved round by round in one run:

- A training step (forward, ``backward``, ``clip_grad_norm_``, optimizer ``step``, ``zero_grad``,
  inside ``accumulate``) of a 2-layer MLP (width 64, batch 32) under FSDP2 and under DeepSpeed
  ZeRO-2: the loop written by hand on the engine (``fully_shard``; ``DeepSpeedEngine.backward`` /
  ``step``), then through Accelerate's and hasten's ``Accelerator``. What each library adds over
  the hand-written loop is its per-step overhead. Accelerate does not run these engines on CPU
  processes, so its state is given what it would hold on GPUs (as in the differential tests).
- ``LocalSGD`` averaging the parameters of a 12-layer MLP (24 tensors): Accelerate all-reduces each
  parameter after a barrier; hasten packs them into one all-reduce.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timing import rank_environment
from torch import nn
from torch.nn import functional

LIBRARIES = ("accelerate", "hasten")
WIDTH, BATCH = 64, 32
Step = Callable[[tuple[torch.Tensor, torch.Tensor]], None]


def _mlp(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers - 1):
        blocks += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(WIDTH, 10))


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(dist.get_rank())
    return [
        (torch.randn(BATCH, WIDTH, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator))
        for _ in range(count)
    ]


def _reset_states() -> None:
    from accelerate.state import AcceleratorState as TheirState
    from accelerate.state import GradientState as TheirGradients

    from hasten.state import AcceleratorState, GradientState

    TheirState._reset_state(reset_partial_state=True)
    TheirGradients._reset_state()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _ds_config() -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }


def _accelerator(library: str, engine: str) -> Any:
    import importlib

    lib = importlib.import_module(library)
    utils = importlib.import_module(f"{library}.utils")
    if engine == "fsdp2":
        plugin = utils.FullyShardedDataParallelPlugin(fsdp_version=2)
        accelerator = lib.Accelerator(cpu=True, fsdp_plugin=plugin)
        if library == "accelerate":  # what its state holds on GPUs
            for state in (lib.PartialState(), accelerator.state):
                state.distributed_type = utils.DistributedType.FSDP
            accelerator.state.fsdp_plugin = plugin
        return accelerator
    accelerator = lib.Accelerator(deepspeed_plugin=utils.DeepSpeedPlugin(hf_ds_config=_ds_config()))
    if library == "accelerate":  # it counts one process on CPU
        for state in (lib.PartialState(), accelerator.state):
            state.num_processes = dist.get_world_size()
            state.process_index = state.local_process_index = dist.get_rank()
    return accelerator


def _raw(engine: str) -> Step:
    net = _mlp()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    if engine == "deepspeed":
        import deepspeed

        config = {
            **_ds_config(),
            "train_batch_size": BATCH * dist.get_world_size(),
            "gradient_accumulation_steps": 1,
        }
        ds, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)

        def ds_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            ds.backward(functional.cross_entropy(ds(batch[0]), batch[1]))
            ds.step()

        return ds_step
    from torch.distributed.fsdp import fully_shard

    fully_shard(net)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        functional.cross_entropy(net(batch[0]), batch[1]).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def _library(library: str, engine: str) -> Step:
    accelerator = _accelerator(library, engine)
    net = _mlp()
    net, optimizer = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=1e-3))

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        with accelerator.accumulate(net):
            accelerator.backward(functional.cross_entropy(net(batch[0]), batch[1]))
            accelerator.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()

    return step


def _timed(step: Callable[[], None], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _interleaved(
    contenders: dict[str, Callable[[], None]], rounds: int, count: int
) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for name in order:
        _timed(contenders[name], max(2, count // 10))  # warm-up
    for _ in range(rounds):
        order = order[1:] + order[:1]
        for name in order:
            dist.barrier()
            runs[name] += _timed(contenders[name], count)
    return runs


def _training(engine: str, rounds: int, count: int) -> dict[str, list[float]]:
    _reset_states()
    batches = _batches(count)
    contenders: dict[str, Callable[[], None]] = {}
    for name, step in [("raw", _raw(engine))] + [(lib, _library(lib, engine)) for lib in LIBRARIES]:
        position = iter(range(10**9))

        def run(step: Step = step, position: Any = position) -> None:
            step(batches[next(position) % len(batches)])

        contenders[name] = run
    return _interleaved(contenders, rounds, count)


def _local_sgd(rounds: int, count: int) -> dict[str, list[float]]:
    import importlib

    _reset_states()
    contenders: dict[str, Callable[[], None]] = {}
    for library in LIBRARIES:
        lib = importlib.import_module(library)
        local_sgd_module = importlib.import_module(f"{library}.local_sgd")
        accelerator = lib.Accelerator(cpu=True)
        net = accelerator.prepare(_mlp(layers=12))
        local_sgd = local_sgd_module.LocalSGD(accelerator, net, local_sgd_steps=1)
        contenders[library] = local_sgd._sync_and_avg_model_params
    return _interleaved(contenders, rounds, count)


def _stats(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[len(ordered) // 10]


def _report_training(engine: str, runs: dict[str, list[float]]) -> None:
    raw = _stats(runs["raw"])
    print(f"### {engine}, 2 processes (gloo): µs per training step, median / p10\n")
    print("| contender | time | overhead over the hand-written loop |")
    print("|---|---|---|")
    for name in ("raw", *LIBRARIES):
        median, p10 = _stats(runs[name])
        over = "" if name == "raw" else f"{(median - raw[0]) * 1e6:+.0f} / {(p10 - raw[1]) * 1e6:+.0f}"
        print(f"| {name} | {median * 1e6:.0f} / {p10 * 1e6:.0f} | {over} |")
    print()


def _report_local_sgd(runs: dict[str, list[float]]) -> None:
    theirs, ours = _stats(runs["accelerate"]), _stats(runs["hasten"])
    print("### LocalSGD averaging 24 parameters, 2 processes (gloo): µs per average, median / p10\n")
    print("| Accelerate | hasten | Accelerate / hasten |")
    print("|---|---|---|")
    print(
        f"| {theirs[0] * 1e6:.0f} / {theirs[1] * 1e6:.0f} | {ours[0] * 1e6:.0f} / {ours[1] * 1e6:.0f} | "
        f"{theirs[0] / ours[0]:.2f}× / {theirs[1] / ours[1]:.2f}× |"
    )
    print()


def _clean(measure: Callable[..., dict[str, list[float]]], *args: Any) -> dict[str, list[float]]:
    """Run ``measure`` and restore the environment (Accelerate writes ``ACCELERATE_USE_*`` into it)."""
    saved = dict(os.environ)
    try:
        return measure(*args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run(rank: int, world: int, port: int, rounds: int, count: int, engines: list[str]) -> None:
    os.environ.update(rank_environment(rank, world, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from hasten.state import PartialState

    PartialState()  # forms the gloo group both libraries adopt
    reports = [(engine, _clean(_training, engine, rounds, count)) for engine in engines]
    sgd = _clean(_local_sgd, rounds, count)
    if rank == 0:
        for engine, runs in reports:
            _report_training(engine, runs)
        _report_local_sgd(sgd)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (after a warm-up)")
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--engines", nargs="*", default=["fsdp2", "deepspeed"])
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_run, args=(2, port, args.rounds, args.steps, args.engines), nprocs=2, join=True)


if __name__ == "__main__":
    main()
