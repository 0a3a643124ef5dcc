"""BnbQuantizationConfig, DataLoaderConfiguration and ProjectConfiguration: defaults, conversions,
validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hasten.utils.dataclasses import (
    BnbQuantizationConfig,
    CustomDtype,
    DataLoaderConfiguration,
    ProjectConfiguration,
)
from hasten.utils.errors import ConfigurationError


def test_bnb_8bit_defaults() -> None:
    config = BnbQuantizationConfig(load_in_8bit=True)
    assert (config.llm_int8_threshold, config.torch_dtype, config.target_dtype) == (
        6.0,
        torch.float16,
        torch.int8,
    )


def test_bnb_4bit_dtypes() -> None:
    config = BnbQuantizationConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bf16"
    )
    assert (config.bnb_4bit_compute_dtype, config.torch_dtype, config.target_dtype) == (
        torch.bfloat16,
        torch.bfloat16,
        CustomDtype.INT4,
    )
    explicit = BnbQuantizationConfig(load_in_4bit=True, torch_dtype="fp32", skip_modules=["lm_head"])
    assert (explicit.torch_dtype, explicit.skip_modules) == (torch.float32, ["lm_head"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "load_in_8bit=False and load_in_4bit=False: set exactly one of them to True"),
        ({"load_in_8bit": True, "load_in_4bit": True}, "set exactly one of them"),
        ({"load_in_8bit": 1}, "load_in_8bit=1 must be True or False"),
        ({"load_in_8bit": True, "llm_int8_threshold": "6"}, "llm_int8_threshold='6' must be a number"),
        (
            {"load_in_4bit": True, "llm_int8_threshold": 4.0},
            "llm_int8_threshold=4.0 only applies to 8-bit quantization",
        ),
        (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "int4"},
            r"bnb_4bit_quant_type='int4' is not valid; expected one of \['fp4', 'nf4'\]",
        ),
        (
            {"load_in_4bit": True, "bnb_4bit_compute_dtype": "fp64"},
            r"bnb_4bit_compute_dtype='fp64' is not valid; expected one of \['fp32', 'fp16', 'bf16'\]",
        ),
        ({"load_in_4bit": True, "torch_dtype": torch.int8}, "torch_dtype=torch.int8 is not supported"),
        (
            {"load_in_8bit": True, "skip_modules": "lm_head"},
            "skip_modules='lm_head' must be a list of module names",
        ),
        ({"load_in_8bit": True, "keep_in_fp32_modules": [1]}, r"keep_in_fp32_modules=\[1\] must be a list"),
    ],
)
def test_bnb_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        BnbQuantizationConfig(**kwargs)  # type: ignore[arg-type]


def test_bnb_config_quantizes_a_layer_with_bitsandbytes() -> None:
    """The settings are what bitsandbytes' 4-bit layer takes, and it quantizes on CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    config = BnbQuantizationConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="fp32"
    )
    layer = bnb.nn.Linear4bit(
        64,
        64,
        compute_dtype=config.bnb_4bit_compute_dtype,
        quant_type=config.bnb_4bit_quant_type,
        compress_statistics=config.bnb_4bit_use_double_quant,
    )
    reference = torch.nn.Linear(64, 64)
    layer.load_state_dict(reference.state_dict())
    layer = layer.to("cpu")  # moving the layer quantizes its weight
    assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
    x = torch.randn(2, 64)
    assert torch.allclose(layer(x), reference(x), atol=0.5)


def test_data_loader_configuration() -> None:
    config = DataLoaderConfiguration()
    assert (config.split_batches, config.dispatch_batches, config.even_batches, config.data_seed) == (
        False,
        None,
        True,
        None,
    )
    assert DataLoaderConfiguration(dispatch_batches=True, data_seed=3).data_seed == 3
    with pytest.raises(ConfigurationError, match="data_seed=-1 must be at least 0"):
        DataLoaderConfiguration(data_seed=-1)
    with pytest.raises(ConfigurationError, match="split_batches=None is not a boolean"):
        DataLoaderConfiguration(split_batches=None)  # type: ignore[arg-type]


def test_project_configuration_directories(tmp_path: Path) -> None:
    config = ProjectConfiguration(project_dir=str(tmp_path))
    assert config.logging_dir == str(tmp_path)
    separate = ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs"))
    separate.set_directories(str(tmp_path / "elsewhere"))
    assert (separate.project_dir, separate.logging_dir) == (
        str(tmp_path / "elsewhere"),
        str(tmp_path / "logs"),
    )
    later = ProjectConfiguration()
    later.set_directories(tmp_path)  # type: ignore[arg-type]
    assert later.logging_dir == str(tmp_path)


def test_project_configuration_validation() -> None:
    with pytest.raises(ConfigurationError, match="total_limit=0 must be at least 1"):
        ProjectConfiguration(total_limit=0)
    with pytest.raises(ConfigurationError, match="iteration=-2 must be at least 0"):
        ProjectConfiguration(iteration=-2)
    with pytest.raises(ConfigurationError, match="automatic_checkpoint_naming='sometimes' is not a boolean"):
        ProjectConfiguration(automatic_checkpoint_naming="sometimes")  # type: ignore[arg-type]
