"""Shards under a size limit and the safetensors writer (utils/sharding.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hasten.utils.constants import SAFE_WEIGHTS_NAME, WEIGHTS_NAME
from hasten.utils.sharding import save_sharded_safetensors, shard_checkpoint


def _state() -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.full((25,), float(i)) for i in range(8)}  # 100 bytes each


def test_shards_fill_in_order_under_the_limit() -> None:
    shards, index = shard_checkpoint(_state(), max_shard_size=250)
    assert list(shards) == [f"pytorch_model-0000{i}-of-00004.bin" for i in range(1, 5)]
    assert all(len(shard) == 2 for shard in shards.values())
    assert index is not None and index["metadata"]["total_size"] == 800
    assert index["weight_map"]["layer7.weight"] == "pytorch_model-00004-of-00004.bin"


def test_one_shard_has_no_index_and_big_tensors_get_their_own() -> None:
    shards, index = shard_checkpoint(_state(), "10GB")
    assert list(shards) == [WEIGHTS_NAME] and index is None
    big = {"a": torch.ones(10), "huge": torch.ones(1000), "b": torch.ones(10)}
    shards, _ = shard_checkpoint(big, max_shard_size="1KB")
    assert [sorted(shard) for shard in shards.values()] == [["a"], ["huge"], ["b"]]


def test_shared_storage_is_counted_once_and_kept_together() -> None:
    weight = torch.ones(25)
    state = {"a": weight, "b": torch.ones(25), "c": weight, "d": torch.ones(25)}
    _shards, index = shard_checkpoint(state, max_shard_size=200)
    assert index is not None and index["metadata"]["total_size"] == 300
    assert index["weight_map"]["a"] == index["weight_map"]["c"]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match=r"size='big' is not a size hasten can read"):
        shard_checkpoint(_state(), "big")


def test_writer_round_trips_with_an_index_written_last(tmp_path: Path) -> None:
    state = _state()
    state["tied"] = state["layer0.weight"]
    written = save_sharded_safetensors(state, tmp_path, max_shard_size=300)
    assert written[-1] == f"{SAFE_WEIGHTS_NAME}.index.json"
    index = json.loads((tmp_path / written[-1]).read_text())
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / file))
    assert set(loaded) == set(_state()) and "tied" not in index["weight_map"]
    assert all(torch.equal(loaded[name], tensor) for name, tensor in _state().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)
