"""Disk offload folders (utils/offload.py): exact round trips, Accelerate's format, lazy reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hasten.big_modeling import init_empty_weights
from hasten.utils.errors import CheckpointError
from hasten.utils.offload import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    extract_submodules_state_dict,
    load_offloaded_weight,
    load_offloaded_weights,
    offload_state_dict,
    offload_weight,
    save_offload_index,
)

TENSORS = {
    "f32": torch.randn(3, 4),
    "bf16": torch.randn(5).to(torch.bfloat16),
    "f8": torch.randn(6).to(torch.float8_e4m3fn),
    "flags": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.empty(0, 3),
    "i64": torch.arange(4),
    "strided": torch.arange(12.0).reshape(3, 4).t(),
}


def test_every_dtype_round_trips_exactly(tmp_path: Path) -> None:
    offload_state_dict(tmp_path, TENSORS)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["bf16"] == {"dtype": "bfloat16", "shape": [5]} and index["scalar"]["shape"] == []
    loader = OffloadedWeightsLoader(save_folder=tmp_path)
    assert sorted(loader) == sorted(TENSORS) and len(loader) == len(TENSORS)
    for name, tensor in TENSORS.items():
        loaded = loader[name]
        assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
        assert torch.equal(
            loaded.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)
        )


def test_reads_are_lazy_copy_on_write_maps(tmp_path: Path) -> None:
    index = offload_weight(torch.ones(4), "w", tmp_path)
    loaded = load_offloaded_weight(tmp_path / "w.dat", index["w"])
    loaded += 1  # writable, and the file is untouched
    assert torch.equal(load_offloaded_weight(tmp_path / "w.dat", index["w"]), torch.ones(4))


def test_folders_are_exchanged_with_accelerate(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate.utils.offload")
    state = {"a": torch.randn(2, 3), "b": torch.randn(4).to(torch.bfloat16), "c": torch.tensor(7)}
    accelerate.offload_state_dict(str(tmp_path / "theirs"), state)
    offload_state_dict(tmp_path / "ours", state)
    for name, tensor in state.items():
        assert torch.equal(OffloadedWeightsLoader(save_folder=tmp_path / "theirs")[name], tensor)
        theirs = accelerate.OffloadedWeightsLoader(save_folder=str(tmp_path / "ours"))
        assert torch.equal(theirs[name], tensor)


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    index = offload_weight(torch.ones(8), "w", tmp_path)
    (tmp_path / "w.dat").write_bytes(b"\0" * 5)
    with pytest.raises(
        CheckpointError,
        match=r"w.dat' holds 5 bytes but its index entry \(torch.float32, shape \[8\]\) needs 32",
    ):
        load_offloaded_weight(tmp_path / "w.dat", index["w"])
    with pytest.raises(CheckpointError, match=r"cannot be read"):
        load_offloaded_weight(tmp_path / "missing.dat", index["w"])
    with pytest.raises(CheckpointError, match=r"malformed"):
        load_offloaded_weight(tmp_path / "w.dat", {"dtype": "float32"})


def test_names_that_escape_the_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"weight name '../evil' cannot be used as a file name"):
        offload_weight(torch.ones(1), "../evil", tmp_path)


def test_index_merges_and_must_be_an_object(tmp_path: Path) -> None:
    save_offload_index({"a": {"dtype": "float32", "shape": [1]}}, tmp_path)
    save_offload_index({"b": {"dtype": "float32", "shape": [2]}}, tmp_path)
    assert set(json.loads((tmp_path / "index.json").read_text())) == {"a", "b"}
    (tmp_path / "index.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"must hold a JSON object, not list"):
        OffloadedWeightsLoader(save_folder=tmp_path)


def test_loader_mixes_memory_disk_and_safetensors(tmp_path: Path) -> None:
    save_file({"x.weight": torch.full((2,), 3.0)}, tmp_path / "model.safetensors")
    index = {
        "y": {
            "safetensors_file": str(tmp_path / "model.safetensors"),
            "weight_name": "x.weight",
            "dtype": "float16",
        }
    }
    loader = OffloadedWeightsLoader(state_dict={"z": torch.zeros(1)}, index=index)
    assert loader["y"].dtype == torch.float16 and torch.equal(
        loader["y"], torch.full((2,), 3.0, dtype=torch.float16)
    )
    assert list(loader) == ["z", "y"]
    with pytest.raises(ValueError, match=r"needs a state_dict, a save_folder or an index"):
        OffloadedWeightsLoader()
    with pytest.raises(CheckpointError, match=r"'w' is a .dat entry but no save_folder"):
        OffloadedWeightsLoader(index={"w": {"dtype": "float32", "shape": [1]}})["w"]


def test_prefixed_views_and_submodule_extraction() -> None:
    data = {"a.0.w": 1, "a.1.w": 2, "ab.w": 3, "b": 4}
    view = PrefixedDataset(data, "a.")
    assert view["0.w"] == 1 and list(view) == ["a.0.w", "a.1.w"]
    assert extract_submodules_state_dict(data, ["a"]) == {"a.0.w": 1, "a.1.w": 2}
    assert extract_submodules_state_dict(data, ["a.1", "b"]) == {"a.1.w": 2, "b": 4}
    assert extract_submodules_state_dict(data, [""]) == data


def test_offloaded_weights_load_into_a_meta_model(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    offload_state_dict(tmp_path, source.state_dict())
    with init_empty_weights():
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    load_offloaded_weights(model, json.loads((tmp_path / "index.json").read_text()), tmp_path)
    x = torch.randn(2, 3)
    assert torch.equal(model(x), source(x))
    load_offloaded_weights(model, {}, tmp_path)  # nothing to do


def test_numpy_is_not_needed_to_know_the_dtype(tmp_path: Path) -> None:
    index = offload_weight(torch.randn(3).to(torch.float8_e5m2), "f8", tmp_path)
    assert index["f8"]["dtype"] == "float8_e5m2"
    assert np.fromfile(tmp_path / "f8.dat", dtype=np.uint8).size == 3
