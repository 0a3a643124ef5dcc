"""Exact resume at the loader level: a run saved mid-epoch and rebuilt from scratch continues bitwise.

The scenario trains nothing but draws like training does: each step runs a dropout layer on
the batch and records the batch and the dropout output. At step ``k`` it saves the loader's
``state_dict()`` (through ``torch.save`` / ``torch.load(weights_only=True)``) and the global RNG
state. A rebuild, seeded differently as a new process would be before ``load_state``, prepares
a new loader, restores both and follows the recipe: ``skip_first_batches(loader,
state["batches_yielded"])`` for the rest of the epoch (a stateful loader continues by itself),
then the loader itself. Batches and dropout draws after ``k`` must equal the uninterrupted
run's. Runs on 1 process and on 2 real gloo ranks.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

EPOCHS = 3
SAMPLES = 22  # 11 batches of 2 on one rank: the last round is uneven on 2 ranks


def _loader(options: dict[str, Any], seed: int) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    from hasten.data_loader import prepare_data_loader
    from hasten.utils.random import set_seed

    set_seed(seed)
    data = TensorDataset(torch.arange(SAMPLES).float().unsqueeze(1).repeat(1, 4))
    dispatch = options.get("dispatch", False)
    return prepare_data_loader(
        DataLoader(data, batch_size=2, shuffle=True),
        put_on_device=dispatch,
        device=torch.device("cpu"),
        dispatch_batches=dispatch,
        rng_types=["generator"],
        use_seedable_sampler=options.get("seedable", False),
        use_stateful_dataloader=options.get("stateful", False),
    )


def _step(layer: torch.nn.Module, batch: Any) -> list[float]:
    (x,) = batch
    return x[:, 0].tolist() + layer(x).flatten().tolist()


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resume_scenario(options: dict[str, Any], save_at: int) -> tuple[list[Any], list[Any]]:
    """Both runs' records from step ``save_at`` on: (uninterrupted, resumed)."""
    from hasten.data_loader import skip_first_batches

    layer = torch.nn.Dropout(0.5)
    loader = _loader(options, seed=0)
    records, saved = [], None
    for _ in range(EPOCHS):
        for batch in loader:
            records.append(_step(layer, batch))
            if len(records) == save_at:
                saved = (_roundtrip(loader.state_dict()), torch.get_rng_state())
    assert saved is not None, "save_at is past the end of the run"

    loader = _loader(options, seed=1234)  # a new process: other seed, fresh loader
    state, rng = saved
    loader.load_state_dict(state)
    torch.set_rng_state(rng)
    resumed = []
    position = state["batches_yielded"]
    first = loader if options.get("stateful") else skip_first_batches(loader, position)
    for batch in first:
        resumed.append(_step(layer, batch))
    while len(resumed) < len(records) - save_at:
        for batch in loader:
            resumed.append(_step(layer, batch))
    return records[save_at:], resumed


CASES = [
    pytest.param({"seedable": True}, id="seedable"),
    pytest.param({"seedable": False}, id="random-sampler"),
    pytest.param({"seedable": False, "stateful": True}, id="stateful"),
    pytest.param({"seedable": True, "stateful": True}, id="stateful-seedable"),
    pytest.param({"seedable": False, "dispatch": True}, id="dispatch"),
]


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("save_at", [3, 15, 22])  # mid first epoch, mid second, end of second
def test_resume_is_exact_on_one_process(options: dict[str, Any], save_at: int) -> None:
    uninterrupted, resumed = resume_scenario(options, save_at)
    assert resumed == uninterrupted


def _on_ranks(options: dict[str, Any], save_at: int) -> bool:
    uninterrupted, resumed = resume_scenario(options, save_at)
    assert resumed == uninterrupted, f"first difference at {_first_difference(uninterrupted, resumed)}"
    return True


def _first_difference(a: list[Any], b: list[Any]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("options", CASES)
def test_resume_is_exact_on_two_ranks(options: dict[str, Any], ranks2: Any) -> None:
    assert ranks2.run(_on_ranks, options, 8) == [True, True]  # mid second epoch on 2 ranks (6 per epoch)
