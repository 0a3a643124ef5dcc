"""Training-loop overhead: a raw torch loop, Accelerate and hasten, interleaved in one run.

Run: ``.venv/bin/python bench/bench_accelerator.py`` (1 process, then 2 gloo ranks on 127.0.0.1;
needs Accelerate). ``--ranks 1`` or ``--ranks 2`` runs one layout; ``--epochs`` sets the rounds.

The model is a 2-layer MLP (64 -> 64 -> 10) on 20,000 synthetic rows, batch 32, shuffled, where
framework overhead dominates. Scenarios: plain steps, ``accumulate`` over 4 batches, bf16
autocast, and evaluation with ``gather_for_metrics``. The raw loop is what one writes by hand:
``DataLoader`` (with ``DistributedSampler`` and DDP on 2 ranks; ``no_sync`` while accumulating;
``all_gather_into_tensor`` for evaluation). Accelerate and hasten run the same script, with the
library as the only difference. Each round runs one epoch of every contender, in a rotating
order; every batch is timed, and the table gives the median and 10th percentile per batch and
the overhead over raw torch. Each process uses one torch thread. ``--startup`` adds the time of
``import`` + ``Accelerator()`` + ``prepare`` in a fresh interpreter; ``--floor N`` times N
gathers of one evaluation batch on 2 ranks alone (raw ``all_gather_into_tensor`` and each
library's ``gather``), the floor under the evaluation scenario.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timing import rank_environment
from torch import nn
from torch.nn import functional

ROWS, WIDTH, BATCH, CLASSES = 20_000, 64, 32, 10
VALIDATION_ROWS = 4_001  # odd: the last batch is padded across 2 ranks
SCENARIOS = ("plain", "accumulate 4", "bf16", "evaluation")
LIBRARIES = ("accelerate", "hasten")


def _data(rows: int, seed: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, WIDTH, generator=generator)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    return torch.utils.data.TensorDataset(features, labels)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, CLASSES))


Epoch = Callable[[int], list[tuple[float, float]]]


def _timed(batches: Any, step: Callable[[Any], None]) -> list[tuple[float, float]]:
    """Wall-clock and this thread's CPU time of each batch (fetching it included)."""
    times = []
    wall, cpu = time.perf_counter(), time.thread_time()
    for batch in batches:
        step(batch)
        now_wall, now_cpu = time.perf_counter(), time.thread_time()
        times.append((now_wall - wall, now_cpu - cpu))
        wall, cpu = now_wall, now_cpu
    return times


def _raw(scenario: str, world: int) -> Epoch:
    """The loop written by hand with torch alone."""
    evaluation = scenario == "evaluation"
    dataset = _data(VALIDATION_ROWS if evaluation else ROWS, 1)
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=not evaluation, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=sampler is None and not evaluation, sampler=sampler
    )
    model = _model()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = 4 if scenario == "accumulate 4" else 1
    counter = [0]

    def train(batch: Any) -> None:
        x, y = batch
        counter[0] += 1
        sync = counter[0] % steps == 0
        context = model.no_sync() if world > 1 and not sync else _NULL
        with context:
            if scenario == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)
                loss = functional.cross_entropy(out.float(), y)
            else:
                loss = functional.cross_entropy(model(x), y)
            (loss / steps if steps > 1 else loss).backward()
        if sync:
            optimizer.step()
            optimizer.zero_grad()

    def evaluate(batch: Any) -> None:
        x, y = batch
        with torch.no_grad():
            preds = model(x).argmax(-1)
        if world > 1:
            both = torch.stack([preds, y])
            out = torch.empty(world * 2, preds.shape[0], dtype=both.dtype)
            dist.all_gather_into_tensor(out, both)

    def epoch(number: int) -> list[float]:
        if sampler is not None:
            sampler.set_epoch(number)
        return _timed(loader, evaluate if evaluation else train)

    return epoch


def _library(name: str, scenario: str) -> Epoch:
    """The same loop through ``name``'s Accelerator (``accelerate`` or ``hasten``)."""
    library = importlib.import_module(name)
    evaluation = scenario == "evaluation"
    kwargs: dict[str, Any] = {"cpu": True}
    if scenario == "accumulate 4":
        kwargs["gradient_accumulation_steps"] = 4
    if scenario == "bf16":
        kwargs["mixed_precision"] = "bf16"
    accelerator = library.Accelerator(**kwargs)
    dataset = _data(VALIDATION_ROWS if evaluation else ROWS, 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=not evaluation)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accumulate = scenario == "accumulate 4"

    def train(batch: Any) -> None:
        x, y = batch
        context = accelerator.accumulate(model) if accumulate else _NULL
        with context:
            loss = functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()

    def evaluate(batch: Any) -> None:
        x, y = batch
        with torch.no_grad():
            preds = model(x).argmax(-1)
        accelerator.gather_for_metrics((preds, y))

    return lambda number: _timed(loader, evaluate if evaluation else train)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


_NULL = _Null()


def _reset_states() -> None:
    from accelerate.state import AcceleratorState as TheirState
    from accelerate.state import GradientState as TheirGradients

    from hasten.state import AcceleratorState, GradientState

    TheirState._reset_state(reset_partial_state=True)
    TheirGradients._reset_state()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _stats(times: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Median and 10th percentile of the wall-clock time, median of the CPU time, per batch."""
    wall = sorted(t[0] for t in times)
    return statistics.median(wall), wall[len(wall) // 10], statistics.median(t[1] for t in times)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def _share(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs > 0 else "n/a"


def _report(world: int, results: dict[str, dict[str, list[tuple[float, float]]]]) -> None:
    print(f"### {world} process{'es (gloo)' if world > 1 else ''}: µs per batch\n")
    print(
        "| scenario | raw: median / p10 / CPU | Accelerate | hasten | Accelerate's overhead | hasten's "
        "overhead "
        "| hasten's overhead / Accelerate's |"
    )
    print("|---|---|---|---|---|---|---|")
    for scenario, runs in results.items():
        raw, theirs, ours = (_stats(runs[name]) for name in ("raw", "accelerate", "hasten"))
        over_theirs = [theirs[i] - raw[i] for i in range(3)]
        over_ours = [ours[i] - raw[i] for i in range(3)]
        cells = [" / ".join(_us(value) for value in stats) for stats in (raw, theirs, ours)]
        overheads = [" / ".join(f"{value * 1e6:+.0f}" for value in over) for over in (over_theirs, over_ours)]
        shares = " / ".join(_share(over_ours[i], over_theirs[i]) for i in range(3))
        print(f"| {scenario} | {' | '.join(cells)} | {' | '.join(overheads)} | {shares} |")
    print()


def _run(rank: int, world: int, port: int, epochs: int, scenarios: list[str]) -> None:
    if world > 1:
        os.environ.update(rank_environment(rank, world, port))
    torch.set_num_threads(1)
    from hasten.state import PartialState

    PartialState()  # forms the gloo group both libraries adopt
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for scenario in scenarios:
        _reset_states()
        contenders: dict[str, Epoch] = {"raw": _raw(scenario, world)}
        for name in LIBRARIES:
            contenders[name] = _library(name, scenario)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
        order = list(contenders)
        for name in order:  # warm-up epoch
            contenders[name](0)
        for number in range(1, epochs + 1):
            order = order[1:] + order[:1]
            for name in order:
                if world > 1:
                    dist.barrier()
                runs[name] += contenders[name](number)
        results[scenario] = runs
    if rank == 0:
        _report(world, results)
    if world > 1:
        dist.destroy_process_group()


def _floor(rank: int, world: int, port: int, calls: int) -> None:
    """What one evaluation batch's gather costs by itself on ``world`` ranks: the raw loop's one
    ``all_gather_into_tensor`` of the stacked predictions and labels (the floor of any gather), and
    each library's ``gather`` of the ``(predictions, labels)`` pair, interleaved call by call."""
    os.environ.update(rank_environment(rank, world, port))
    torch.set_num_threads(1)
    from accelerate.utils import gather as their_gather

    from hasten.state import PartialState
    from hasten.utils.operations import gather as our_gather

    PartialState()
    import accelerate

    accelerate.PartialState(cpu=True)  # as the Accelerator(cpu=True) of the scenarios
    preds, labels = torch.randint(0, CLASSES, (BATCH,)), torch.randint(0, CLASSES, (BATCH,))
    out = torch.empty(world * 2, BATCH, dtype=torch.int64)
    contenders: dict[str, Callable[[], Any]] = {
        "raw all_gather_into_tensor": lambda: dist.all_gather_into_tensor(out, torch.stack([preds, labels])),
        "accelerate gather": lambda: their_gather((preds, labels)),
        "hasten gather": lambda: our_gather((preds, labels)),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for number in range(calls + 20):
        for name, call in contenders.items():
            dist.barrier()
            wall, cpu = time.perf_counter(), time.thread_time()
            call()
            if number >= 20:  # warm-up
                times[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
    if rank == 0:
        print(f"### The floor: one gather of (predictions, labels) on {world} gloo ranks, µs per call\n")
        print("| call | median / p10 / CPU |")
        print("|---|---|")
        for name, runs in times.items():
            print(f"| {name} | {' / '.join(_us(value) for value in _stats(runs))} |")
        print()
    dist.destroy_process_group()


_STARTUP = """
import time
start = time.perf_counter()
import torch
from torch import nn
torch_done, torch_cpu = time.perf_counter(), time.process_time()
from {library} import Accelerator
accelerator = Accelerator(cpu=True)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(256, 64)), batch_size=32)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
built = time.perf_counter()
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
end, end_cpu = time.perf_counter(), time.process_time()
print(end - torch_done, end - built, end_cpu - torch_cpu)
"""


def _startup(repeats: int) -> None:
    """Fresh interpreters, the libraries alternating; the minimum is the figure least disturbed by
    other load on the machine. A first, untimed round per library writes the bytecode caches an
    installed package has (``PYTHONDONTWRITEBYTECODE`` would otherwise time compiling hasten's
    sources against Accelerate's cached bytecode)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    totals: dict[str, list[float]] = {library: [] for library in LIBRARIES}
    prepares: dict[str, list[float]] = {library: [] for library in LIBRARIES}
    cpus: dict[str, list[float]] = {library: [] for library in LIBRARIES}
    for round_ in range(repeats + 1):
        for library in LIBRARIES:
            out = subprocess.run(
                [sys.executable, "-c", _STARTUP.format(library=library)],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            if round_ == 0:
                continue
            total, prepare, cpu = map(float, out.stdout.split())
            totals[library].append(total)
            prepares[library].append(prepare)
            cpus[library].append(cpu)
    print(f"### Start-up, 1 process: fresh interpreter after `import torch`, {repeats} runs alternating\n")
    print(
        "| library | import + Accelerator() + prepare: min / median | its CPU time: min / median "
        "| prepare alone: min / median |"
    )
    print("|---|---|---|---|")
    for library in LIBRARIES:
        total, prepare, cpu = sorted(totals[library]), sorted(prepares[library]), sorted(cpus[library])
        print(
            f"| {library} | {total[0] * 1e3:.0f} / {statistics.median(total) * 1e3:.0f} ms | "
            f"{cpu[0] * 1e3:.0f} / {statistics.median(cpu) * 1e3:.0f} ms | "
            f"{prepare[0] * 1e3:.2f} / {statistics.median(prepare) * 1e3:.2f} ms |"
        )
    print()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per contender (after a warm-up)")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument(
        "--startup", type=int, default=0, help="repeats of the start-up measurement (0: skip)"
    )
    parser.add_argument(
        "--floor", type=int, default=0, help="calls of the 2-rank gather floor measurement (0: skip)"
    )
    args = parser.parse_args()
    if args.startup:
        _startup(args.startup)
    if args.floor:
        mp.spawn(_floor, args=(2, _free_port(), args.floor), nprocs=2, join=True)
    for world in args.ranks:
        if world == 1:
            _run(0, 1, 0, args.epochs, args.scenarios)
            continue
        mp.spawn(_run, args=(world, _free_port(), args.epochs, args.scenarios), nprocs=world, join=True)


if __name__ == "__main__":
    main()
