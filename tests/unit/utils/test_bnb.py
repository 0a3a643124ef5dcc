"""Quantized loading with the real bitsandbytes CPU backend: 8-bit and 4-bit, in memory and from a
checkpoint."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("bitsandbytes")

from hasten.big_modeling import init_empty_weights
from hasten.utils.bnb import (
    get_keys_to_not_convert,
    has_4bit_bnb_layers,
    load_and_quantize_model,
    replace_with_bnb_layers,
)
from hasten.utils.dataclasses.configs import BnbQuantizationConfig

EIGHT = BnbQuantizationConfig(load_in_8bit=True, torch_dtype="fp32")
FOUR = BnbQuantizationConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="fp32", torch_dtype="fp32"
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.down(torch.relu(self.up(x)))))


def _source() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))


def _bytes(module: nn.Module) -> int:
    return sum(
        t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor)
    )


@pytest.mark.parametrize(
    ("config", "factor", "tolerance"), [(EIGHT, 3.5, 0.02), (FOUR, 6.0, 0.2)], ids=["8bit", "4bit"]
)
def test_in_memory_model_is_quantized_and_close(
    config: BnbQuantizationConfig, factor: float, tolerance: float
) -> None:
    source = _source()
    expected = source(X)
    before = _bytes(source.up)
    model = load_and_quantize_model(copy.deepcopy(source), config)
    assert type(model.up).__name__ == ("Linear8bitLt" if config.load_in_8bit else "Linear4bit")
    assert type(model.head) is nn.Linear  # the last module is kept in full precision
    assert before / _bytes(model.up) >= factor
    with torch.no_grad():
        assert (model(X).float() - expected).abs().max() < tolerance
    assert has_4bit_bnb_layers(model) == config.load_in_4bit


@pytest.mark.parametrize("config", [EIGHT, FOUR], ids=["8bit", "4bit"])
def test_meta_model_is_quantized_while_loading(tmp_path: Path, config: BnbQuantizationConfig) -> None:
    source = _source()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    with init_empty_weights():
        model = Net()
    model = load_and_quantize_model(
        model,
        config,
        weights_location=tmp_path,
        device_map="auto",
        max_memory={"cpu": "1GiB"},
        no_split_module_classes=["Net"],
    )
    in_memory = load_and_quantize_model(copy.deepcopy(source), config)
    with torch.no_grad():
        assert torch.equal(model(X), in_memory(X))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_skip_and_fp32_modules_are_honoured() -> None:
    config = BnbQuantizationConfig(
        load_in_8bit=True, torch_dtype="fp16", skip_modules=["down"], keep_in_fp32_modules=["norm"]
    )
    model = load_and_quantize_model(_source(), config)
    assert type(model.down) is nn.Linear and model.down.weight.dtype == torch.float16
    assert model.norm.weight.dtype == torch.float32
    assert type(model.head).__name__ == "Linear8bitLt"  # skip_modules replaces the default (last module) list
    assert get_keys_to_not_convert(_source()) == ["head"]


def test_tied_weights_are_never_quantized() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False))
    model[2].weight = model[0].weight
    assert get_keys_to_not_convert(model) == ["0", "2"]
    replace_with_bnb_layers(model, EIGHT, modules_to_not_convert=get_keys_to_not_convert(model))
    assert type(model[1]).__name__ == "Linear8bitLt" and type(model[2]) is nn.Linear


def test_bad_inputs_are_explained(tmp_path: Path) -> None:
    with init_empty_weights():
        model = Net()
    with pytest.raises(ValueError, match=r"on the meta device .* but weights_location is None"):
        load_and_quantize_model(model, EIGHT)
    with pytest.raises(ValueError, match=r"device_map='fast' must be a dict or one of"):
        load_and_quantize_model(_source(), EIGHT, device_map="fast")
    with pytest.raises(ValueError, match=r"sends \['up'\] to disk; quantized layers cannot be offloaded"):
        load_and_quantize_model(
            _source(), EIGHT, device_map={"up": "disk", "down": "cpu", "norm": "cpu", "head": "cpu"}
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"load_in_8bit=False and load_in_4bit=False: set exactly one"),
        ({"load_in_8bit": True, "load_in_4bit": True}, r"set exactly one"),
        (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "int3"},
            r"bnb_4bit_quant_type='int3' is not valid; expected one of \['fp4', 'nf4'\]",
        ),
        (
            {"load_in_8bit": True, "torch_dtype": "fp64"},
            r"torch_dtype='fp64' is not valid; expected one of \['fp32', 'fp16', 'bf16'\] or a torch.dtype",
        ),
        ({"load_in_8bit": "yes"}, r"load_in_8bit='yes' must be True or False"),
        (
            {"load_in_8bit": True, "skip_modules": "head"},
            r"skip_modules='head' must be a list of module names",
        ),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BnbQuantizationConfig(**kwargs)


def test_config_resolves_dtypes() -> None:
    config = BnbQuantizationConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype="bf16", torch_dtype=torch.float16
    )
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and str(config.target_dtype) == "int4"
    assert BnbQuantizationConfig(load_in_8bit=True).target_dtype == torch.int8


def test_a_missing_bitsandbytes_names_the_package_and_extra() -> None:
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch\nfrom hasten.utils.bnb import has_4bit_bnb_layers\n"
        "has_4bit_bnb_layers(torch.nn.Linear(1, 1))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (
        "ImportError: quantize models to 8 or 4 bits needs the optional package 'bitsandbytes'"
        in result.stderr
    )
    assert "pip install 'hasten[test]'" in result.stderr


def test_get_quantized_model_device_map() -> None:
    from hasten.utils.bnb import get_quantized_model_device_map

    model = _source()
    replace_with_bnb_layers(model, EIGHT, modules_to_not_convert=["head"])
    assert get_quantized_model_device_map(model, EIGHT) == {"": "cpu"}
    assert get_quantized_model_device_map(
        model, EIGHT, {"up": "cpu", "down": "cpu", "norm": "cpu", "head": "cpu"}
    )
    assert get_quantized_model_device_map(model, EIGHT, "sequential", max_memory={"cpu": 10**9}) == {
        "": "cpu"
    }
    with pytest.raises(ValueError, match=r"device_map='fastest' must be a dict or one of"):
        get_quantized_model_device_map(model, EIGHT, "fastest")
    with pytest.raises(
        ValueError, match=r"device_map sends \['down'\] to disk; quantized layers cannot be offloaded"
    ):
        get_quantized_model_device_map(
            model, EIGHT, {"up": "cpu", "down": "disk", "norm": "cpu", "head": "cpu"}
        )


def test_get_parameter_device() -> None:
    from hasten.utils.bnb import get_parameter_device

    assert get_parameter_device(nn.Linear(2, 2)) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"ReLU has no parameters"):
        get_parameter_device(nn.ReLU())


def test_quantize_and_offload_8bit_writes_int8_weights_and_scales(tmp_path: Path) -> None:
    from hasten.utils.bnb import quantize_and_offload_8bit
    from hasten.utils.offload import load_offloaded_weight

    model = _source()
    weight = model.up.weight.detach().clone()
    replace_with_bnb_layers(model, EIGHT)
    index: dict[str, object] = {}
    quantize_and_offload_8bit(model, weight, "up.weight", torch.float32, tmp_path, index, None)
    assert index == {
        "up.weight": {"dtype": "int8", "shape": [256, 64]},
        "up.SCB": {"dtype": "float32", "shape": [256]},
    }
    assert model.up.weight.device.type == "meta"
    quantized = load_offloaded_weight(tmp_path / "up.weight.dat", index["up.weight"])  # type: ignore[arg-type]
    scales = load_offloaded_weight(tmp_path / "up.SCB.dat", index["up.SCB"])  # type: ignore[arg-type]
    restored = quantized.float() * scales[:, None] / 127
    assert (restored - weight).abs().max() <= scales.max() / 127  # within one quantization step
    # Already quantized: the weight and its scales are written as given.
    again: dict[str, object] = {}
    quantize_and_offload_8bit(model, quantized, "up.weight", None, tmp_path / "again", again, scales)
    assert again == index and model.up.weight.device.type == "meta"
