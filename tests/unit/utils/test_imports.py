"""Optional-package probes: cached, never importing what they probe, and `require`'s message."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from packaging.version import Version

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
        "'megatron', 'swanlab', 'trackio', 'tensorboardX', 'pytest', 'triton', 'peft', 'torchdata', "
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


class _Hide:
    """A meta-path finder under which ``name`` cannot be found: the package looks uninstalled."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.split(".")[0] == self.name:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by the test)")


@pytest.fixture
def without_torchao(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    package_version.cache_clear()
    for name in [name for name in sys.modules if name.split(".")[0] == "torchao"]:
        monkeypatch.delitem(sys.modules, name)  # find_spec answers from sys.modules first
    monkeypatch.setattr(sys, "meta_path", [_Hide("torchao"), *sys.meta_path])
    yield
    package_version.cache_clear()


def test_accelerate_probes_on_this_machine() -> None:
    assert (
        imports.is_bnb_available() and imports.is_bnb_available("0.37") and not imports.is_bnb_available("99")
    )
    assert imports.is_4bit_bnb_available() and imports.is_8bit_bnb_available()
    assert imports.is_bitsandbytes_multi_backend_available()  # bitsandbytes >= 0.44 runs on the CPU
    assert imports.is_numpy_available() and not imports.is_numpy_available("99.0")
    assert imports.is_torch_distributed_available() and imports.is_weights_only_available()
    assert imports.is_pippy_available()  # torch.distributed.pipelining ships with torch 2.4+
    assert imports.is_pytest_available() and imports.is_fp8_available()  # torchao is in the test extra
    assert imports.is_fp16_available() and not imports.is_habana_gaudi1()
    assert not any(
        probe()
        for probe in (
            imports.is_hpu_available,
            imports.is_mlu_available,
            imports.is_musa_available,
            imports.is_sdaa_available,
            imports.is_neuron_available,
            imports.is_rocm_available,
            imports.is_xccl_available,
            imports.is_transformer_engine_mxfp8_available,
            imports.is_sagemaker_available,
        )
    )
    torchdata = package_version("torchdata")
    expected = torchdata is not None and Version(torchdata) >= Version("0.8")
    assert imports.is_torchdata_stateful_dataloader_available() == expected


def test_simple_probes_agree_with_the_import_system() -> None:
    import importlib.util

    for probe, module in [
        (imports.is_pandas_available, "pandas"),
        (imports.is_datasets_available, "datasets"),
        (imports.is_torchvision_available, "torchvision"),
        (imports.is_timm_available, "timm"),
        (imports.is_triton_available, "triton"),
    ]:
        assert probe() == (importlib.util.find_spec(module) is not None), module


def test_torchao_required_says_how_to_install(without_torchao: None) -> None:
    @imports.torchao_required
    def convert() -> str:
        return "converted"

    assert not imports.is_torchao_available()
    with pytest.raises(ImportError, match=r"convert\(\) needs the optional package 'torchao'.*hasten\[ao\]"):
        convert()


def test_torchao_required_runs_the_function_when_installed() -> None:
    assert imports.torchao_required(lambda: "ran")() == "ran"


def test_deepspeed_required_refuses_a_state_set_up_for_something_else() -> None:
    from hasten.state import AcceleratorState
    from hasten.utils.dataclasses.plugins.deepspeed import DeepSpeedPlugin

    @imports.deepspeed_required
    def engine_step(value: int) -> int:
        return value + 1

    assert engine_step(1) == 2  # no state: nothing to contradict
    AcceleratorState()
    with pytest.raises(ValueError, match=r"engine_step\(\) needs DeepSpeed.*distributed_type='NO'"):
        engine_step(1)
    AcceleratorState._reset_state()
    AcceleratorState(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2))
    assert engine_step(2) == 3
