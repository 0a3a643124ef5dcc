"""Checkpoints written by Accelerate load in hasten, and dispatched models agree with Accelerate's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(6)
        )
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)


X = torch.randn(3, 32)


def _source() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize(
    ("safe", "shard"), [(True, "10KB"), (True, "10GB"), (False, "10KB"), (False, "10GB")]
)
def test_accelerate_checkpoints_load_in_hasten(tmp_path: Path, safe: bool, shard: str) -> None:
    from hasten.big_modeling import init_empty_weights
    from hasten.utils.loading import load_checkpoint_in_model

    source = _source()
    accelerate.Accelerator(cpu=True).save_model(
        source, tmp_path, max_shard_size=shard, safe_serialization=safe
    )
    with init_empty_weights():
        model = Net().eval()
    load_checkpoint_in_model(model, tmp_path)
    assert torch.equal(model(X), source(X))


def test_dispatch_matches_accelerate(tmp_path: Path) -> None:
    from accelerate import dispatch_model as their_dispatch

    from hasten.big_modeling import dispatch_model

    device_map = {
        "blocks.0": "cpu",
        "blocks.1": "disk",
        "blocks.2": "cpu",
        "blocks.3": "disk",
        "blocks.4": "cpu",
        "blocks.5": "cpu",
        "norm": "cpu",
    }
    ours, theirs = _source(), _source()
    dispatch_model(ours, device_map, offload_dir=tmp_path / "ours")
    their_dispatch(theirs, device_map, offload_dir=str(tmp_path / "theirs"))
    assert torch.equal(ours(X), theirs(X))
    hooked = lambda m: sorted(n for n, mod in m.named_modules() if hasattr(mod, "_hf_hook"))  # noqa: E731
    assert hooked(ours) == hooked(theirs)


def test_hasten_sharded_checkpoints_load_in_accelerate(tmp_path: Path) -> None:
    from accelerate import init_empty_weights as accelerate_empty
    from accelerate.utils import load_checkpoint_in_model as accelerate_load

    from hasten.utils.sharding import save_sharded_safetensors

    source = _source()
    save_sharded_safetensors(source.state_dict(), tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with accelerate_empty():
        model = Net()
    accelerate_load(model, str(tmp_path / "model.safetensors.index.json"), device_map={"": "cpu"})
    assert torch.equal(model(X), source(X))
