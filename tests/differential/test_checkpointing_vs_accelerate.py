"""Training-state folders cross over: one written by Accelerate's ``save_state`` loads in hasten, one
written by hasten loads in Accelerate, with the same weights, optimizer and scheduler states, step,
registered objects and RNG states; what Accelerate pickled is read only with the opt-in."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.unit.test_checkpointing import Counter

pytest.importorskip("accelerate")


class Pickled:
    """Not plain data: Accelerate pickles it, hasten reads it only when asked to."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pickled)


def _reset_both() -> None:
    from accelerate.state import AcceleratorState as TheirState
    from accelerate.state import GradientState as TheirGradients

    from hasten import AcceleratorState, GradientState

    TheirState._reset_state(reset_partial_state=True)
    TheirGradients._reset_state()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run(library: str, seed: int, steps: int) -> tuple[Any, nn.Module, Any, Any, Counter]:
    accelerator = importlib.import_module(library).Accelerator(gradient_accumulation_steps=2)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.9)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    for step in range(steps):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.full((2, 4), float(step))).pow(2).mean())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return accelerator, model, optimizer, scheduler, counter


def _snapshot(
    accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, counter: Counter
) -> dict[str, Any]:
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict()["state"],
        "scheduler": scheduler.state_dict()["last_epoch"],
        "step": accelerator.step,
        "counter": counter.value,
        "draw": torch.rand(4),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    for index, state in a["optimizer"].items():
        assert all(
            torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"][index][k]))
            for k, v in state.items()
        )
    assert (a["scheduler"], a["step"], a["counter"]) == (b["scheduler"], b["step"], b["counter"])
    assert torch.equal(a["draw"], b["draw"])


@pytest.mark.parametrize(("writer", "reader"), [("accelerate", "hasten"), ("hasten", "accelerate")])
def test_a_folder_written_by_one_loads_in_the_other(tmp_path: Path, writer: str, reader: str) -> None:
    accelerator, model, optimizer, scheduler, counter = _run(writer, seed=0, steps=4)
    counter.value = 17
    torch.manual_seed(5)
    accelerator.save_state(str(tmp_path / "state"))
    saved = _snapshot(accelerator, model, optimizer, scheduler, counter)
    _reset_both()
    accelerator, model, optimizer, scheduler, counter = _run(reader, seed=1, steps=2)
    accelerator.load_state(str(tmp_path / "state"))
    _same(_snapshot(accelerator, model, optimizer, scheduler, counter), saved)
    _reset_both()
    assert "model.safetensors" in os.listdir(tmp_path / "state")


def test_what_accelerate_pickled_loads_only_with_the_opt_in(tmp_path: Path) -> None:
    accelerator, *_, counter = _run("accelerate", seed=0, steps=1)
    counter.value = Pickled()
    accelerator.save_state(str(tmp_path / "state"))
    _reset_both()
    from hasten.utils.errors import CheckpointError

    accelerator, *_, counter = _run("hasten", seed=0, steps=1)
    with pytest.raises(
        CheckpointError, match=r'custom_checkpoint_0.pkl .*load_kwargs=\{"weights_only": False\}'
    ):
        accelerator.load_state(str(tmp_path / "state"))
    assert counter.value == 0
    accelerator.load_state(str(tmp_path / "state"), load_kwargs={"weights_only": False})
    assert counter.value == Pickled()
    _reset_both()
