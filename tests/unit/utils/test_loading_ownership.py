"""Loaded weights belong to the model: the checkpoint can be overwritten, truncated or deleted afterwards.

Loading into a model with real weights fills them in place, so parameter identity (and an
optimizer built before the load) survives; ``zero_copy=True`` is the opt-in to views of the file.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hasten.big_modeling import init_empty_weights, load_checkpoint_and_dispatch
from hasten.utils.checkpoint_reader import SafetensorsFile
from hasten.utils.errors import CheckpointError
from hasten.utils.loading import load_checkpoint_in_model, load_state_dict
from hasten.utils.offload import OffloadedWeightsLoader, load_offloaded_weights, offload_state_dict
from tests.unit.utils.test_loading import Net

# Each case loads a checkpoint, then does to the file what users do (save the loaded weights to the
# same path with torch.save or save_file, write other weights there, write bytes in place, truncate,
# delete and rewrite) and reports whether the weights kept their values (and, when they were saved
# back, whether the file holds them). Run in a child process: with views of the file, truncation kills
# the process with SIGBUS, which must fail the test rather than the test run.
SCENARIOS = r"""
import json, os, sys
import torch
from torch import nn
from safetensors.torch import load_file, save_file
from hasten.big_modeling import init_empty_weights, load_checkpoint_and_dispatch
from hasten.utils.loading import load_checkpoint_in_model, load_state_dict
from hasten.utils.offload import load_offloaded_weights, offload_state_dict

folder = sys.argv[1]
torch.manual_seed(0)
SOURCE = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64))
STATE = {k: v.contiguous() for k, v in SOURCE.state_dict().items()}
HOWS = ("torch.save them back", "save_file them back", "torch.save others", "save_file others", "in place",
        "truncate", "delete and rewrite")

def fresh():
    with init_empty_weights():
        return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64))

def clobber(path, how, loaded):
    others = {k: torch.zeros_like(v) for k, v in STATE.items()}
    if how == "torch.save them back":  # the save that truncates the file it is reading from
        torch.save(loaded, path)
        with open(path, "rb") as handle:  # a handle: torch.load reads *.safetensors paths as safetensors
            back = torch.load(handle, weights_only=True)
        return all(torch.equal(v, STATE[k]) for k, v in back.items())
    if how == "save_file them back":
        save_file(loaded, path)
        return all(torch.equal(v, STATE[k]) for k, v in load_file(path).items())
    if how == "torch.save others":
        torch.save(others, path)
    elif how == "save_file others":
        save_file(others, path)
    elif how == "in place":
        with open(path, "r+b") as handle:
            handle.seek(1024)
            handle.write(b"\x7f" * (os.path.getsize(path) - 1024))
    elif how == "truncate":
        open(path, "wb").close()
    elif how == "delete and rewrite":
        os.remove(path)
        with open(path, "wb") as handle:
            handle.write(b"\x00" * 100)
    return True

def unchanged(tensors):
    return all(torch.equal(tensors[k], STATE[k]) for k in STATE)

results = {}
for how in HOWS:
    for kind in ("meta model", "real model", "load_state_dict", "dispatch", ".bin", "offload folder"):
        path = os.path.join(folder, f"{kind}-{how}".replace(" ", "_"))
        if kind == "offload folder":
            offload_state_dict(path, STATE)
            model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64))
            load_offloaded_weights(model, json.load(open(os.path.join(path, "index.json"))), path)
            saved = all(
                clobber(os.path.join(path, name + ".dat"), how, {name: tensor})
                for name, tensor in model.state_dict().items()
            )
            results[f"{kind} / {how}"] = saved and unchanged(model.state_dict())
            continue
        file = path + (".bin" if kind == ".bin" else ".safetensors")
        torch.save(STATE, file) if kind == ".bin" else save_file(STATE, file)
        if kind in ("meta model", ".bin"):
            model = fresh()
            load_checkpoint_in_model(model, file)
            tensors = model.state_dict()
        elif kind == "real model":
            model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64))
            load_checkpoint_in_model(model, file)
            tensors = model.state_dict()
        elif kind == "load_state_dict":
            tensors = load_state_dict(file)
        else:
            model = load_checkpoint_and_dispatch(fresh(), file, device_map={"": "cpu"})
            tensors = model.state_dict()
        saved = clobber(file, how, tensors)
        results[f"{kind} / {how}"] = saved and unchanged(tensors)
print(json.dumps(results))
"""


def test_the_checkpoint_can_be_overwritten_truncated_or_deleted_after_loading(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCENARIOS, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"the process died ({result.returncode}): {result.stderr[-2000:]}"
    results = json.loads(result.stdout.splitlines()[-1])
    assert len(results) == 42
    assert [case for case, kept in results.items() if not kept] == []


def _checkpoint(folder: Path, kind: str) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in Net().state_dict().items() if k != "head.weight"}
    state["body.1.running_mean"] = torch.randn(6)
    if kind == "safetensors":
        save_file(state, folder / "model.safetensors")
        return folder / "model.safetensors", state
    legacy = kind == "legacy .bin"
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return folder / "pytorch_model.bin", state


@pytest.mark.parametrize("kind", ["safetensors", ".bin", "legacy .bin"])
def test_loading_into_real_weights_keeps_the_parameter_objects(tmp_path: Path, kind: str) -> None:
    path, state = _checkpoint(tmp_path, kind)
    torch.manual_seed(2)
    model = Net()
    parameters = dict(model.named_parameters())
    running_mean = model.body[1].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the load
    load_checkpoint_in_model(model, path)
    assert all(model.get_parameter(name) is parameter for name, parameter in parameters.items())
    assert model.head.weight is model.embed.weight and model.body[1].running_mean is running_mean
    assert all(torch.equal(model.state_dict()[name], value) for name, value in state.items())
    model.train()
    model(torch.tensor([1, 2, 3])).sum().backward()
    gradient = model.body[0].weight.grad.clone()
    optimizer.step()  # trains the loaded values
    assert torch.allclose(model.body[0].weight, state["body.0.weight"] - 0.1 * gradient)


def test_a_new_dtype_replaces_the_tensor_and_a_meta_model_gets_fresh_memory(tmp_path: Path) -> None:
    path, state = _checkpoint(tmp_path, "safetensors")
    model = Net()
    weight = model.body[0].weight
    load_checkpoint_in_model(model, path, dtype=torch.float16)
    assert model.body[0].weight is not weight and model.body[0].weight.dtype == torch.float16
    assert model.head.weight is model.embed.weight
    with init_empty_weights():
        empty = Net()
    load_checkpoint_in_model(empty, path)
    storages = {t.untyped_storage().data_ptr() for t in empty.state_dict().values() if t.numel()}
    assert len(storages) == len(state)  # one storage each (the tie shares one): safetensors can save them
    save_file(
        {k: v for k, v in empty.state_dict().items() if k != "head.weight"}, tmp_path / "again.safetensors"
    )


def test_legacy_bin_files_load_with_weights_only(tmp_path: Path) -> None:
    path, state = _checkpoint(tmp_path, "legacy .bin")
    with init_empty_weights():
        model = Net()
    load_checkpoint_in_model(model, tmp_path)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in state.items())
    assert torch.equal(load_state_dict(path)["body.0.bias"], state["body.0.bias"])
    torch.save({"weight": torch.ones(2), "note": Path("x")}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"does not unpickle them by default"):
        load_state_dict(path)


def test_zero_copy_is_an_opt_in_whose_tensors_alias_the_file(tmp_path: Path) -> None:
    path, state = _checkpoint(tmp_path, "safetensors")
    with init_empty_weights():
        model = Net()
    load_checkpoint_in_model(model, path, zero_copy=True)
    viewed = load_state_dict(path, zero_copy=True)
    owned = load_state_dict(path)
    assert torch.equal(model.body[0].weight, state["body.0.weight"])
    with open(path, "r+b") as handle:  # write into the file in place, as the docstrings warn
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        handle.write(b"\x00" * (os.path.getsize(path) - 8 - header))
    assert not torch.equal(model.body[0].weight, state["body.0.weight"])  # the documented aliasing
    assert not torch.equal(viewed["body.0.weight"], state["body.0.weight"])
    assert all(torch.equal(owned[name], value) for name, value in state.items())  # the default owns


def test_load_checkpoint_and_dispatch_passes_zero_copy(tmp_path: Path) -> None:
    path, state = _checkpoint(tmp_path, "safetensors")
    with init_empty_weights():
        model = Net()
    load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"}, zero_copy=True)
    replacement = tmp_path / "new.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, replacement)
    os.replace(replacement, path)  # replacing the file is safe: the map keeps the old one alive
    assert torch.equal(model.body[0].weight, state["body.0.weight"])
    with init_empty_weights():
        model = Net()
    load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"}, zero_copy=True)
    with open(path, "r+b") as handle:  # writing in place is not: the weights view the file
        handle.seek(os.path.getsize(path) - 4)
        handle.write(b"\x00\x00\x80\x3f")
    assert model.embed.weight[-1, -1] == 1.0  # the last float of the file (embed.weight is stored last)


def test_offloaded_weights_are_read_into_memory_of_their_own(tmp_path: Path) -> None:
    weights = {"w": torch.arange(6.0)}
    offload_state_dict(tmp_path / "off", weights)
    loader = OffloadedWeightsLoader(save_folder=tmp_path / "off")
    first = loader["w"]
    (tmp_path / "off" / "w.dat").write_bytes(b"\x00" * 24)  # rewritten in place, same size
    assert torch.equal(first, torch.arange(6.0)) and torch.equal(loader["w"], torch.zeros(6))
    (tmp_path / "off" / "w.dat").write_bytes(b"\x00" * 8)
    with pytest.raises(CheckpointError, match=r"holds 8 bytes but its index entry .* needs 24"):
        loader["w"]
    model = nn.Linear(3, 2, bias=False)
    weight = model.weight
    offload_state_dict(tmp_path / "lin", {"weight": torch.ones(2, 3)})
    load_offloaded_weights(model, json.loads((tmp_path / "lin" / "index.json").read_text()), tmp_path / "lin")
    assert model.weight is weight and torch.equal(weight, torch.ones(2, 3))


def test_safetensors_entries_of_an_offload_index_are_read_and_checked(tmp_path: Path) -> None:
    save_file({"a": torch.arange(4.0), "b": torch.ones(2)}, tmp_path / "model.safetensors")
    entry = {"safetensors_file": str(tmp_path / "model.safetensors"), "weight_name": "a", "dtype": "float16"}
    loader = OffloadedWeightsLoader(index={"x": entry, "y": {**entry, "weight_name": "zz"}})
    value = loader["x"]
    assert value.dtype == torch.float16 and torch.equal(value, torch.arange(4.0).half())
    save_file({"a": torch.zeros(4), "b": torch.ones(2)}, tmp_path / "model.safetensors")  # replaced: re-read
    assert torch.equal(loader["x"], torch.zeros(4).half()) and torch.equal(value, torch.arange(4.0).half())
    with pytest.raises(
        CheckpointError, match=r"offloaded weight 'y' points at 'zz' in .* which holds no such"
    ):
        loader["y"]
    with open(tmp_path / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a valid safetensors file"):
        loader["x"]


def test_reads_check_their_destination_and_the_file_length(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, path)
    reader = SafetensorsFile(path)
    out = torch.empty(3, 2)
    reader.read_into("a", out)  # any shape with the same dtype and size
    assert torch.equal(out.reshape(2, 3), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(
        ValueError, match=r"cannot read 'a' \(torch.float32, shape \[2, 3\]\) into a torch.float16"
    ):
        reader.read_into("a", torch.empty(2, 3, dtype=torch.float16))
    with pytest.raises(
        ValueError, match=r"can only read into a contiguous CPU tensor, not one on cpu with strides"
    ):
        reader.read_into("a", torch.empty(3, 2).t())
    with open(path, "r+b") as handle:  # the file shrinks after its header was checked
        handle.truncate(path.stat().st_size - 8)
    with pytest.raises(
        CheckpointError, match=r"ended after \d+ bytes, before the 24 bytes at offset \d+ could be"
    ):
        reader.read("a")
    reader.close()


def test_a_truncated_legacy_bin_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(100)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"is not a readable torch checkpoint \(truncated or corrupt\)"):
        load_state_dict(path)


def test_a_missing_offload_file_is_named(tmp_path: Path) -> None:
    entry = {"safetensors_file": str(tmp_path / "gone.safetensors"), "weight_name": "a", "dtype": "float32"}
    with pytest.raises(CheckpointError, match=r"offloaded weights file '.*gone.safetensors' cannot be read"):
        OffloadedWeightsLoader(index={"a": entry})["a"]
    with pytest.raises(CheckpointError, match=r"offloaded weight '.*w.dat' cannot be read"):
        OffloadedWeightsLoader(index={"w": {"dtype": "float32", "shape": [2]}}, save_folder=tmp_path)["w"]


def test_copies_of_open_readers_reopen_the_file(tmp_path: Path) -> None:
    save_file({"a": torch.arange(3.0)}, tmp_path / "model.safetensors")
    entry = {"safetensors_file": str(tmp_path / "model.safetensors"), "weight_name": "a"}
    loader = OffloadedWeightsLoader(index={"a": entry})
    loader["a"]  # opens the file
    copied, restored = copy.deepcopy(loader), pickle.loads(pickle.dumps(loader))
    del loader
    gc.collect()  # the original's descriptor is closed; the copies never shared it
    assert torch.equal(copied["a"], torch.arange(3.0)) and torch.equal(restored["a"], torch.arange(3.0))
    reader = SafetensorsFile(tmp_path / "model.safetensors")
    twin = copy.deepcopy(reader)
    reader.close()
    assert twin._fd != reader._fd and torch.equal(twin.read("a"), torch.arange(3.0))
