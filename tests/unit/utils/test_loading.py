"""Streaming checkpoint loads: files, shards, .bin, dtype rules, disk entries, and every refusal."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hasten.big_modeling import init_empty_weights
from hasten.utils.checkpoint_reader import SafetensorsFile, checkpoint_files
from hasten.utils.errors import CheckpointError
from hasten.utils.loading import load_checkpoint_in_model, load_state_dict


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 4))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


def _source() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    net.body[1].running_mean.normal_()
    net.body[1].num_batches_tracked.fill_(7)
    return net


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state.pop("head.weight")  # safetensors keeps one name per shared tensor
    return state


def _save_single(net: nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_state(net), folder / "model.safetensors", metadata={"format": "pt"})
    return folder / "model.safetensors"


def _save_sharded(net: nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = _state(net)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def _meta_net() -> Net:
    with init_empty_weights():
        return Net().eval()


@contextlib.contextmanager
def _refused_unchanged(model: nn.Module, error: type[Exception], match: str) -> Iterator[None]:
    """The block raises ``error`` matching ``match``, and leaves ``model``'s weights as they were."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        yield
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _assert_same(model: nn.Module, reference: nn.Module) -> None:
    theirs = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu", name
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("layout", ["single", "folder", "sharded", "index"])
def test_loads_into_a_meta_model_without_a_device_map(tmp_path: Path, layout: str) -> None:
    source = _source()
    if layout == "single":
        checkpoint: Path = _save_single(source, tmp_path)
    elif layout == "folder":
        checkpoint = _save_single(source, tmp_path).parent
    elif layout == "sharded":
        checkpoint = _save_sharded(source, tmp_path)
    else:
        checkpoint = _save_sharded(source, tmp_path) / "model.safetensors.index.json"
    model = _meta_net()
    load_checkpoint_in_model(model, checkpoint)
    _assert_same(model, source)
    assert model.head.weight is model.embed.weight  # re-tied
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(model(ids), source(ids))


def test_bin_files_load_with_weights_only(tmp_path: Path) -> None:
    source = _source()
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    model = Net()
    load_checkpoint_in_model(model, tmp_path)
    _assert_same(model, source)


def test_bin_files_that_need_pickle_are_refused_with_the_way_out(tmp_path: Path) -> None:
    torch.save({"weight": torch.ones(2), "note": Path("x")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"does not unpickle them by default.*weights_only=False"):
        load_checkpoint_in_model(nn.Linear(2, 2), tmp_path)


def test_dtype_casts_floats_only_and_keeps_fp32_modules(tmp_path: Path) -> None:
    source = _source()
    model = _meta_net()
    load_checkpoint_in_model(
        model, _save_single(source, tmp_path), dtype="float16", keep_in_fp32_modules=["body.2"]
    )
    assert model.embed.weight.dtype == torch.float16 and model.body[0].weight.dtype == torch.float16
    assert model.body[2].weight.dtype == torch.float32  # kept
    assert (
        model.body[1].num_batches_tracked.dtype == torch.int64
        and model.body[1].num_batches_tracked.item() == 7
    )
    assert isinstance(model.body[0].weight, nn.Parameter) and model.body[0].weight.requires_grad


def test_keep_in_fp32_matches_whole_module_names_only(tmp_path: Path) -> None:
    model = _meta_net()
    load_checkpoint_in_model(
        model, _save_single(_source(), tmp_path), dtype=torch.bfloat16, keep_in_fp32_modules=["ody"]
    )
    assert model.body[0].weight.dtype == torch.bfloat16


def test_disk_entries_stay_in_the_checkpoint_file(tmp_path: Path) -> None:
    source = _source()
    checkpoint = _save_single(source, tmp_path / "ckpt")
    model = _meta_net()
    device_map = {"embed": "cpu", "head": "cpu", "body.0": "disk", "body.1": "cpu", "body.2": "disk"}
    load_checkpoint_in_model(model, checkpoint, device_map=device_map, offload_folder=tmp_path / "off")
    assert model.body[0].weight.device.type == "meta" and model.body[1].weight.device.type == "cpu"
    index = json.loads((tmp_path / "off" / "index.json").read_text())
    assert sorted(index) == ["body.0.bias", "body.0.weight", "body.2.bias", "body.2.weight"]
    assert (
        index["body.0.weight"]["safetensors_file"] == str(checkpoint)
        and index["body.0.weight"]["dtype"] == "float32"
    )
    assert not any(p.suffix == ".dat" for p in (tmp_path / "off").iterdir())  # nothing was copied


def test_disk_entries_with_a_new_dtype_are_written_to_the_offload_folder(tmp_path: Path) -> None:
    model = _meta_net()
    device_map = {"": "cpu", "body.0": "disk"}
    load_checkpoint_in_model(
        model,
        _save_single(_source(), tmp_path / "c"),
        device_map=device_map,
        offload_folder=tmp_path / "off",
        dtype=torch.float16,
    )
    index = json.loads((tmp_path / "off" / "index.json").read_text())
    assert index["body.0.weight"]["dtype"] == "float16" and (tmp_path / "off" / "body.0.weight.dat").is_file()


def test_disk_without_offload_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"device_map sends \['body'\] to 'disk'; pass offload_folder="):
        load_checkpoint_in_model(
            _meta_net(), _save_single(_source(), tmp_path), device_map={"": "cpu", "body": "disk"}
        )


def test_missing_and_unexpected_keys_warn_or_raise_before_loading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _state(_source())
    state.pop("body.0.bias")
    state["extra.weight"] = torch.ones(1)
    save_file(state, tmp_path / "model.safetensors")
    model = Net()
    with _refused_unchanged(
        model,
        CheckpointError,
        r"strict=True.*nothing was loaded. Missing from the checkpoint: \['body.0.bias'\]; "
        r"not in the model: \['extra.weight'\]",
    ):
        load_checkpoint_in_model(model, tmp_path, strict=True)
    with caplog.at_level(logging.WARNING, logger="hasten.utils.loading"):
        load_checkpoint_in_model(model, tmp_path)
    assert "['extra.weight']" in caplog.text and "['body.0.bias']" in caplog.text


def test_shape_mismatch_names_the_tensor_and_file_and_changes_nothing(tmp_path: Path) -> None:
    state = _state(_source())
    state["body.0.weight"] = torch.ones(7, 4)
    save_file(state, tmp_path / "model.safetensors")
    model = Net()
    with _refused_unchanged(
        model,
        CheckpointError,
        r"nothing was loaded. Shape mismatches: body.0.weight: checkpoint \[7, 4\] "
        r"in model.safetensors, model \[6, 4\]",
    ):
        load_checkpoint_in_model(model, tmp_path)


def test_truncated_and_corrupt_safetensors_are_named(tmp_path: Path) -> None:
    path = _save_single(_source(), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors is not a valid safetensors file: tensor .* claims bytes"
    ):
        load_checkpoint_in_model(Net(), path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"fewer than the 8-byte header length"):
        SafetensorsFile(path)
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"the header claims 1000000000 bytes"):
        SafetensorsFile(path)
    path.write_bytes((4).to_bytes(8, "little") + b"{oops")
    with pytest.raises(CheckpointError, match=r"the header is not valid JSON"):
        SafetensorsFile(path)


def test_index_paths_must_stay_in_the_folder_and_exist(tmp_path: Path) -> None:
    folder = _save_sharded(_source(), tmp_path / "ckpt")
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["embed.weight"] = "../../etc/passwd"
    index.write_text(json.dumps(content))
    with pytest.raises(
        CheckpointError,
        match=r"names shard '../../etc/passwd', which resolves to .* outside the checkpoint folder",
    ):
        checkpoint_files(folder)
    content["weight_map"]["embed.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(
        CheckpointError, match=r"names shard 'model-00009-of-00009.safetensors', but .* does not exist"
    ):
        checkpoint_files(index)


def test_checkpoint_path_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist"):
        checkpoint_files(tmp_path / "nothing.safetensors")
    with pytest.raises(
        CheckpointError, match=r"holds no model.safetensors, pytorch_model.bin or \*.index.json"
    ):
        checkpoint_files(tmp_path)
    (tmp_path / "a.index.json").write_text("{}")
    (tmp_path / "b.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds several indexes"):
        checkpoint_files(tmp_path)
    (tmp_path / "a.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"has no weight_map"):
        checkpoint_files(tmp_path / "a.index.json")


def test_load_state_dict_maps_devices(tmp_path: Path) -> None:
    source = _source()
    path = _save_single(source, tmp_path)
    state = load_state_dict(path, device_map={"": "cpu", "body": "disk"})
    assert set(state) == set(_state(source)) and all(t.device.type == "cpu" for t in state.values())
    assert torch.equal(state["body.0.weight"], source.body[0].weight)


def test_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dtype='float17' is not a torch dtype"):
        load_checkpoint_in_model(Net(), _save_single(_source(), tmp_path), dtype="float17")


def test_offload_8bit_bnb_is_refused_with_the_alternative(tmp_path: Path) -> None:
    source = _source()
    path = _save_single(source, tmp_path)
    with pytest.raises(
        ValueError, match=r"offload_8bit_bnb=True: hasten does not write 8-bit quantized weights"
    ):
        load_checkpoint_in_model(_meta_net(), path, offload_8bit_bnb=True)


@pytest.mark.parametrize("strategy", ["auto", "balanced", "sequential"])
def test_a_strategy_name_as_device_map_points_to_the_functions_that_plan(
    tmp_path: Path, strategy: str
) -> None:
    with pytest.raises(
        TypeError,
        match=rf"load_checkpoint_in_model\(device_map='{strategy}'\): this function takes a dict .*"
        rf"infer_auto_device_map\(model, max_memory=...\) first, or use load_checkpoint_and_dispatch\(model, "
        rf"checkpoint, device_map='{strategy}'\)",
    ):
        load_checkpoint_in_model(_meta_net(), _save_single(_source(), tmp_path), device_map=strategy)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"device_map must be a dict of module name -> device, not list"):
        load_checkpoint_in_model(_meta_net(), tmp_path, device_map=["cpu"])  # type: ignore[arg-type]


def test_device_maps_that_overlap_or_name_absent_devices_are_refused_before_loading(tmp_path: Path) -> None:
    path = _save_single(_source(), tmp_path)
    model = Net()
    with _refused_unchanged(
        model,
        ValueError,
        r"device_map has the keys 'body.0' \('cpu'\) and 'body.0.weight' \('disk'\), and "
        r"'body.0.weight' lies inside 'body.0', so its tensors would get two devices. Give each tensor one",
    ):
        load_checkpoint_in_model(
            model,
            path,
            device_map={"": "cpu", "body.0": "cpu", "body.0.weight": "disk"},
            offload_folder=tmp_path,
        )
    if not torch.cuda.is_available():
        with _refused_unchanged(
            model,
            ValueError,
            r"device_map\[''\]='cuda:0', but this machine has no accelerator \(devices it can use: "
            r"\['cpu', 'disk', 'meta'\]\). Plan the map for this machine",
        ):
            load_checkpoint_in_model(model, path, device_map={"": "cuda:0"})
