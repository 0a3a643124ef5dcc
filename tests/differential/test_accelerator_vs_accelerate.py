"""The same training script through hasten's and Accelerate's Accelerator: the same losses and weights,
bit for bit, on 1 and 2 processes; and models saved by one are read by the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.training import library_run, same_run

pytest.importorskip("accelerate")


def _reset_both() -> None:
    from accelerate.state import AcceleratorState as TheirState
    from accelerate.state import GradientState as TheirGradients

    from hasten import AcceleratorState, GradientState

    TheirState._reset_state(reset_partial_state=True)
    TheirGradients._reset_state()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _both(steps: int, precision: str, prepare_loader: bool) -> tuple[bool, list[float]]:
    theirs = library_run("accelerate", steps, precision, prepare_loader=prepare_loader)
    _reset_both()
    ours = library_run("hasten", steps, precision, prepare_loader=prepare_loader)
    _reset_both()
    return same_run(theirs, ours), ours[0][:3]


CASES = [(1, "no", False), (4, "no", True), (4, "bf16", False), (3, "bf16", True)]


@pytest.mark.parametrize(("steps", "precision", "prepare_loader"), CASES)
def test_one_process_same_as_accelerate(steps: int, precision: str, prepare_loader: bool) -> None:
    same, _ = _both(steps, precision, prepare_loader)
    assert same


@pytest.mark.parametrize(("steps", "precision", "prepare_loader"), CASES)
def test_two_processes_same_as_accelerate(
    ranks2: Any, steps: int, precision: str, prepare_loader: bool
) -> None:
    results = ranks2.run(_both, steps, precision, prepare_loader)
    assert all(same for same, _ in results), results


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("max_shard_size", ["10GB", 600])
def test_models_saved_by_hasten_load_in_accelerate(tmp_path: Path, max_shard_size: int | str) -> None:
    from accelerate.utils import load_checkpoint_in_model as their_load

    from hasten import Accelerator

    accelerator = Accelerator()
    model = accelerator.prepare(_model())
    accelerator.save_model(model, tmp_path, max_shard_size=max_shard_size)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_size == 600)
    loaded = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    their_load(loaded, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_models_saved_by_accelerate_load_in_hasten(tmp_path: Path) -> None:
    import accelerate

    from hasten import load_checkpoint_in_model

    accelerator = accelerate.Accelerator(cpu=True)
    model = accelerator.prepare(_model())
    accelerator.save_model(model, tmp_path, max_shard_size=600)
    _reset_both()
    loaded = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    load_checkpoint_in_model(loaded, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
