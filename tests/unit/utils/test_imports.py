"""Optional-package probes: cached, never importing what they probe, and `require`'s message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hasten.utils import imports
from hasten.utils.imports import (
    is_bf16_available,
    is_cuda_available,
    is_deepspeed_available,
    is_mps_available,
    is_npu_available,
    is_safetensors_available,
    is_torch_xla_available,
    is_xpu_available,
    package_version,
    require,
)

PROBES = sorted(name for name in vars(imports) if name.startswith("is_") and name.endswith("_available"))


def test_probes_answer_booleans_without_importing_the_package() -> None:
    code = (
        "import sys, torch; before = set(sys.modules); from hasten.utils import imports; "
        f"results = [getattr(imports, n)() for n in {PROBES!r}]; "
        "assert all(isinstance(r, bool) for r in results), results; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new & "
        "{'deepspeed', 'bitsandbytes', 'transformers', 'tqdm', 'rich', 'tensorboard', 'wandb', "
        "'mlflow', 'comet_ml', 'aim', 'clearml', 'dvclive', 'torchao', 'transformer_engine', 'msamp', "
        "'megatron', 'swanlab', 'trackio', 'tensorboardX', "
        "'torch_xla', 'intel_extension_for_pytorch', 'safetensors'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_this_machine() -> None:
    assert is_safetensors_available() is True
    assert is_deepspeed_available() is True  # in the test extra
    assert (is_cuda_available(), is_mps_available(), is_xpu_available(), is_npu_available()) == (False,) * 4
    assert is_torch_xla_available() is False
    assert is_torch_xla_available(check_is_tpu=True) is False
    assert is_bf16_available() is True  # CPU bf16


def test_package_version() -> None:
    assert package_version("safetensors") is not None
    assert package_version("hasten_no_such_package") is None


def test_probes_are_cached() -> None:
    package_version.cache_clear()
    package_version("safetensors")
    package_version("safetensors")
    assert package_version.cache_info().hits >= 1


def test_require_passes_for_installed_packages() -> None:
    require("safetensors")


def test_require_names_the_extra() -> None:
    with pytest.raises(
        ImportError,
        match=r"Quantizing needs the optional package 'hasten_absent'.*pip install 'hasten\[bnb\]'",
    ):
        require("hasten_absent", extra="bnb", purpose="Quantizing")


def test_require_without_extra_names_the_distribution() -> None:
    with pytest.raises(
        ImportError,
        match=r"This feature needs the optional package 'hasten_absent'.*pip install hasten_absent",
    ):
        require("hasten_absent")
