"""The script ``hasten test`` launches: a short end-to-end check of the configured set-up.

Run on every process by ``hasten launch``: it forms the process group, checks the collectives
against values every rank can compute alone, checks that seeding gives every rank the same random
numbers, and trains a small model one step with the configured engine (DDP, or FSDP2 when the
launch asks for FSDP version 2), comparing the result with the same step on one process. The main
process prints each check as it passes; any mismatch stops the run with an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

SUCCESS = "Test is a success! You are ready for your distributed training!"


def _check(name: str, passed: bool, detail: str = "") -> None:
    from hasten.state import PartialState

    if not passed:
        raise AssertionError(
            f"hasten test: {name} failed on process {PartialState().process_index}. {detail}"
        )
    PartialState().print(f"ok  {name}")


def check_collectives() -> None:
    """gather, gather_object, broadcast, reduce and pad_across_processes against known values."""
    from hasten.state import PartialState
    from hasten.utils.operations import broadcast, gather, gather_object, pad_across_processes, reduce

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    gathered = gather(torch.tensor([rank, 10 * rank]))
    _check(
        "gather",
        gathered.tolist() == [v for r in range(world) for v in (r, 10 * r)],
        f"got {gathered.tolist()}",
    )
    objects = gather_object([{"rank": rank}])
    _check("gather_object", objects == [{"rank": r} for r in range(world)], f"got {objects}")
    last = broadcast(torch.full((3,), float(rank)), from_process=world - 1)
    _check("broadcast", last.tolist() == [float(world - 1)] * 3, f"got {last.tolist()}")
    total = reduce(torch.tensor([float(rank + 1)]), reduction="sum")
    _check("reduce", total.item() == world * (world + 1) / 2, f"got {total.item()}")
    padded = pad_across_processes(torch.ones(rank + 1), dim=0)
    _check("pad_across_processes", padded.tolist() == [1.0] * (rank + 1) + [0.0] * (world - 1 - rank))
    with state.split_between_processes(list(range(2 * world + 1))) as share:
        shares = gather_object([share])
    _check("split_between_processes", sorted(x for s in shares for x in s) == list(range(2 * world + 1)))


def check_random_state() -> None:
    """After seeding on the main process and synchronising, every rank draws the same numbers."""
    from hasten.state import PartialState
    from hasten.utils.operations import gather
    from hasten.utils.random import set_seed, synchronize_rng_states

    state = PartialState()
    set_seed(1234 + state.process_index)  # different on purpose: synchronising must fix it
    synchronize_rng_states(["torch"])
    draws = gather(torch.rand(2)[None])
    _check("synchronize_rng_states", bool((draws == draws[0]).all()), "ranks drew different numbers")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


def _engine() -> tuple[str, Callable[[nn.Module], nn.Module]]:
    """The engine the launch configured, as a name and a function that wraps a model in it.

    DeepSpeed and the ``Accelerator``'s own engines are not exercised here; they get DDP's check.
    """
    from hasten.state import PartialState
    from hasten.utils.environment import parse_flag_from_env

    if PartialState().num_processes == 1:
        return "one process", lambda model: model
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            auto_wrap_policy="no_wrap"
        )  # the launch's other FSDP settings
        return f"FSDP{plugin.fsdp_version}", plugin.wrap
    return "DDP", lambda model: nn.parallel.DistributedDataParallel(model)


def check_training() -> None:
    """One SGD step on each rank's share of a batch equals the step on the whole batch."""
    from hasten.state import PartialState
    from hasten.utils.operations import gather

    state = PartialState()
    generator = torch.Generator().manual_seed(0)
    inputs, targets = (
        torch.randn(4 * state.num_processes, 4, generator=generator),
        torch.randn(4 * state.num_processes, 1, generator=generator),
    )
    reference = _model()
    _step(reference, inputs, targets)
    name, wrap = _engine()
    model = wrap(_model())
    rows = slice(4 * state.process_index, 4 * state.process_index + 4)
    _step(model, inputs[rows], targets[rows])
    with torch.no_grad():
        outputs = gather(model(inputs[rows]))
        expected = reference(inputs)
    difference = (outputs - expected).abs().max().item()
    _check(f"one training step with {name}", difference < 1e-5, f"largest difference {difference:.3g}")


def main() -> None:
    """Run every check; exit with an error at the first that fails."""
    from hasten.state import PartialState

    state = PartialState()
    state.print(
        f"hasten test: {state.num_processes} process(es), {state.distributed_type.value}, backend "
        f"{state.backend}, device {state.device}, mixed precision "
        f"{os.environ.get('ACCELERATE_MIXED_PRECISION', 'no')}"
    )
    check_collectives()
    check_random_state()
    check_training()
    state.wait_for_everyone()
    state.print(SUCCESS)


if __name__ == "__main__":
    main()
