"""Accelerator.save and save_model on one process: the files, the index, tied weights, stale shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hasten import Accelerator, init_empty_weights, load_checkpoint_in_model
from hasten.utils import ProjectConfiguration, load


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


def _loaded(path: Path) -> Tied:
    with init_empty_weights():
        model = Tied()
    load_checkpoint_in_model(model, str(path))
    return model


def _same(a: nn.Module, b: nn.Module) -> bool:
    ids = torch.arange(10)
    return torch.equal(a(ids), b(ids))


def test_save_model_writes_one_safetensors_file(tmp_path: Path) -> None:
    accelerator = Accelerator(mixed_precision="bf16")
    model = accelerator.prepare(Tied())
    accelerator.save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = _loaded(tmp_path)
    assert loaded.head.weight is loaded.embed.weight  # tied weights stored once, tied again on load
    assert _same(accelerator.unwrap_model(model, keep_fp32_wrapper=False), loaded)


def test_save_model_shards_with_an_index_and_removes_stale_files(tmp_path: Path) -> None:
    accelerator = Accelerator()
    model = accelerator.prepare(Tied())
    accelerator.save_model(model, tmp_path, max_shard_size=400)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[-1] == "model.safetensors.index.json" and len(names) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"embed.weight", "body.weight", "body.bias"}  # head.weight is tied
    assert _same(model, _loaded(tmp_path))
    (tmp_path / "notes.txt").write_text("kept")
    accelerator.save_model(model, tmp_path)  # now one file: the old shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt"]


def test_save_model_in_pickle_format(tmp_path: Path) -> None:
    accelerator = Accelerator()
    model = accelerator.prepare(Tied())
    accelerator.save_model(model, tmp_path, max_shard_size="0.0004MB", safe_serialization=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "pytorch_model-00001-of-00002.bin" and names[-1] == "pytorch_model.bin.index.json"
    assert _same(model, _loaded(tmp_path))
    accelerator.save_model(model, tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_model.bin"]
    assert set(load(tmp_path / "pytorch_model.bin")) == {"embed.weight", "body.weight", "body.bias"}


def test_save_model_refuses_a_file_and_empty_weights(tmp_path: Path) -> None:
    accelerator = Accelerator()
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file; pass a folder"):
        accelerator.save_model(nn.Linear(2, 2), target)
    with init_empty_weights():
        empty = nn.Linear(2, 2)
    with pytest.raises(
        ValueError, match=r"2 parameters of Linear are on the meta device \(e.g. \['weight', 'bias'\]\)"
    ):
        accelerator.save_model(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_writes_once_and_atomically(tmp_path: Path) -> None:
    accelerator = Accelerator(project_config=ProjectConfiguration(save_on_each_node=True))
    accelerator.save({"a": torch.ones(2)}, tmp_path / "state.pt")
    accelerator.save({"a": torch.ones(2)}, tmp_path / "state.safetensors", safe_serialization=True)
    assert torch.equal(load(tmp_path / "state.pt")["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt", "state.safetensors"]
