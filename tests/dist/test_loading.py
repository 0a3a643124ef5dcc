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
