"""Loading with broadcast_from_rank0 on real gloo ranks: one reader, every rank gets the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.ranks import RankFailure


def _build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.BatchNorm1d(4)).eval()


def _load_everywhere(path: str) -> list[float]:
    from hasten.big_modeling import init_empty_weights
    from hasten.state import PartialState
    from hasten.utils.loading import load_checkpoint_in_model

    state = PartialState()
    with init_empty_weights(include_buffers=True):
        model = _build()
    if state.process_index != 0:
        path += ".absent"  # only rank 0 reads: the others would fail on this path if they tried
    load_checkpoint_in_model(model, path, broadcast_from_rank0=True)
    return [float(t.double().sum()) for t in model.state_dict().values()]


@pytest.mark.parametrize("pool", ["ranks2", "ranks4"])
def test_broadcast_from_rank0(pool: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    ranks = request.getfixturevalue(pool)
    source = _build()
    source[3].running_mean.normal_()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    expected = [float(t.double().sum()) for t in source.state_dict().values()]
    assert ranks.run(_load_everywhere, str(tmp_path / "model.safetensors")) == [expected] * ranks.world_size


def test_a_bad_checkpoint_fails_on_every_rank_without_hanging(ranks2, tmp_path: Path) -> None:
    save_file({"0.weight": torch.ones(3, 3)}, tmp_path / "model.safetensors")
    with pytest.raises(RankFailure) as failure:
        ranks2.run(_load_everywhere, str(tmp_path / "model.safetensors"), timeout=60)
    message = str(failure.value)
    sections = message.split("--- rank ")[1:]
    assert len(sections) == 2
    assert all("Shape mismatches: 0.weight: checkpoint [3, 3]" in section for section in sections)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
    optimizer.zero_grad()
    model(torch.linspace(-1, 1, 24).reshape(3, 8)).square().sum().backward()
    optimizer.step()
    return [float(t.double().sum()) for t in model.state_dict().values()]


def _load_under_an_optimizer(path: str, broadcast: bool) -> tuple[bool, list[float]]:
    from hasten.state import PartialState
    from hasten.utils.loading import load_checkpoint_in_model

    state = PartialState()
    torch.manual_seed(100 + state.process_index)  # every rank starts from different weights
    model = _build()
    before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the load
    if broadcast and state.process_index != 0:
        path += ".absent"  # only rank 0 reads
    load_checkpoint_in_model(model, path, broadcast_from_rank0=broadcast)
    same = all(model.get_parameter(name) is parameter for name, parameter in before.items())
    return same, _train_step(model, optimizer)


@pytest.mark.parametrize("broadcast", [False, True], ids=["each rank reads", "broadcast_from_rank0"])
def test_an_optimizer_built_before_the_load_trains_the_loaded_weights(
    ranks2, tmp_path: Path, broadcast: bool
) -> None:
    source = _build()
    source[3].running_mean.normal_()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    expected = _train_step(source, torch.optim.SGD(source.parameters(), lr=0.1))
    results = ranks2.run(_load_under_an_optimizer, str(tmp_path / "model.safetensors"), broadcast)
    assert results == [(True, expected)] * 2
