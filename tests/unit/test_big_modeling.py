"""Dispatch, CPU and disk offload: outputs equal the plain model's, and misuse is explained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hasten.big_modeling import (
    cpu_offload,
    cpu_offload_with_hook,
    disk_offload,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)
from hasten.hooks import remove_hook_from_submodules


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.linear(self.norm(x))


class Stack(nn.Module):
    def __init__(self, depth: int = 4, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(8, 16, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


IDS = torch.tensor([[1, 5, 7, 2]])


def _model() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


def test_cpu_offload_matches_the_plain_model() -> None:
    model = _model()
    expected = model(IDS)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.blocks[0].linear.weight.device.type == "meta"
    assert torch.allclose(model(IDS), expected)


def test_cpu_offload_with_hook_and_chained_pipeline() -> None:
    first, second = _model(), _model()
    expected = second(first(IDS).argmax(-1))
    first, hook_1 = cpu_offload_with_hook(first, execution_device="cpu")
    second, hook_2 = cpu_offload_with_hook(second, execution_device="cpu", prev_module_hook=hook_1)
    assert torch.equal(second(first(IDS).argmax(-1)), expected)
    hook_2.offload()
    hook_2.remove()
    assert not hasattr(second, "_hf_hook")


def test_disk_offload_matches_and_reuses_the_folder(tmp_path: Path) -> None:
    model = _model()
    expected = model(IDS)
    disk_offload(model, tmp_path, execution_device=torch.device("cpu"))
    assert (tmp_path / "index.json").is_file()
    assert torch.allclose(model(IDS), expected)
    again = _model()
    disk_offload(again, tmp_path, execution_device=torch.device("cpu"))  # index present: not rewritten
    assert torch.allclose(again(IDS), expected)


def test_dispatch_with_cpu_and_disk_keeps_ties_and_outputs(tmp_path: Path) -> None:
    model = _model()
    expected = model(IDS)
    device_map = {
        "embed": "cpu",
        "blocks.0": "cpu",
        "blocks.1": "disk",
        "blocks.2": "cpu",
        "blocks.3": "disk",
        "head": "cpu",
    }
    dispatch_model(model, device_map, offload_dir=tmp_path)
    assert model.hf_device_map == device_map
    assert (
        model.blocks[1].linear.weight.device.type == "meta"
        and model.blocks[0].linear.weight.device.type == "cpu"
    )
    assert model.head.weight is model.embed.weight
    assert torch.allclose(model(IDS), expected)


def test_a_dispatched_model_refuses_to_move_but_casts() -> None:
    model = _model()
    dispatch_model(model, {"": "cpu"}, force_hooks=True)
    with pytest.raises(
        RuntimeError,
        match=r"dispatched with device_map=\{'': 'cpu'\}.*Moving it with \.to\(\) to cpu would break",
    ):
        model.to("cpu")
    with pytest.raises(RuntimeError, match=r"\.cuda\(\) to the accelerator"):
        model.cuda()
    model.to(torch.float64)  # dtype only: allowed
    assert model.embed.weight.dtype == torch.float64
    remove_hook_from_submodules(model)
    model.to("cpu")  # hooks removed: moves are the user's call again


def test_a_single_device_map_moves_without_hooks() -> None:
    model = _model()
    dispatch_model(model, {"": "cpu"})
    assert not hasattr(model, "_hf_hook") and model.hf_device_map == {"": "cpu"}


def test_disk_map_needs_a_folder() -> None:
    with pytest.raises(
        ValueError, match=r"device_map sends \['blocks'\] to 'disk', so dispatch_model needs offload_dir"
    ):
        dispatch_model(_model(), {"embed": "cpu", "blocks": "disk", "head": "cpu"})


def test_bad_device_maps_are_explained() -> None:
    with pytest.raises(ValueError, match=r"blocks"):
        dispatch_model(_model(), {"embed": "cpu", "head": "cpu"})  # misses the blocks
    with pytest.raises(ValueError, match=r"'embed.weight' lies inside 'embed', so its tensors would get two"):
        dispatch_model(_model(), {"embed": "cpu", "embed.weight": "disk", "blocks": "cpu", "head": "cpu"})


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ("auto", r"load_checkpoint_and_dispatch\(model, checkpoint, device_map='auto'\) plans and loads"),
        ("gpu", r"pass e.g. \{'': 'cpu'\}, or plan one with infer_auto_device_map"),
    ],
)
def test_dispatch_model_takes_a_dict(device_map: str, message: str) -> None:
    with pytest.raises(
        TypeError,
        match=rf"dispatch_model\(device_map='{device_map}'\): dispatch_model takes a dict .*{message}",
    ):
        dispatch_model(_model(), device_map)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda:0", 0])
def test_dispatching_to_an_absent_accelerator_is_explained(device: str | int) -> None:
    model = _model()
    with pytest.raises(
        ValueError, match=rf"device_map\[''\]={device!r}, but this machine has no accelerator"
    ):
        dispatch_model(model, {"": device})
    assert not hasattr(model, "hf_device_map") and model.embed.weight.device.type == "cpu"


def test_skip_keys_and_preload_classes(tmp_path: Path) -> None:
    model = _model()
    dispatch_model(
        model,
        {"": "cpu", "blocks.0": "disk"},
        offload_dir=tmp_path,
        skip_keys="cache",
        preload_module_classes=["Block"],
        force_hooks=True,
    )
    hook = model.blocks[0]._hf_hook
    hooks = getattr(hook, "hooks", (hook,))
    assert any(getattr(h, "place_submodules", False) for h in hooks)  # preloaded as a whole
    assert not hasattr(model.blocks[0].linear, "_hf_hook") or not getattr(
        model.blocks[0].linear._hf_hook, "offload", False
    )


@pytest.mark.parametrize("skip_keys", ["cache", None])
def test_skip_keys_leave_those_inputs_where_they_are(skip_keys: str | None) -> None:
    model = Stack().eval()
    dispatch_model(
        model, {"embed": "meta", "blocks": "meta", "head": "meta"}, force_hooks=True, skip_keys=skip_keys
    )
    seen: dict[str, str] = {}
    block = model.blocks[0]
    inner = block._old_forward

    def spy(x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        seen.update(x=x.device.type, cache=cache.device.type if cache is not None else "none")
        return inner(x, cache=cache)

    block._old_forward = spy
    block(torch.ones(1, 8), cache=torch.zeros(2))
    assert seen == {"x": "meta", "cache": "cpu" if skip_keys else "meta"}


def _checkpoint(model: nn.Module, folder: Path) -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_load_checkpoint_and_dispatch_under_a_budget(tmp_path: Path, strategy: str) -> None:
    source = _model()
    expected = source(IDS)
    checkpoint = _checkpoint(source, tmp_path)
    with init_empty_weights():
        model = Stack().eval()
    model = load_checkpoint_and_dispatch(
        model,
        checkpoint,
        device_map=strategy,
        max_memory={"cpu": 1000},
        no_split_module_classes=["Block"],
        offload_folder=tmp_path / "offload",
    )
    assert "disk" in model.hf_device_map.values()
    assert torch.allclose(model(IDS), expected)


def test_load_checkpoint_and_dispatch_rejects_unknown_strategies(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"device_map='fastest' is not a strategy; use one of \['auto', 'balanced'"
    ):
        load_checkpoint_and_dispatch(_model(), tmp_path, device_map="fastest")
