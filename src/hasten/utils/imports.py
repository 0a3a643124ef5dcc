"""Cached probes for optional packages and accelerators.

A probe only *looks*: it asks ``importlib`` where a package would be loaded
from and ``importlib.metadata`` for its version, and never imports it, so
calling every probe costs a few file-system lookups and keeps ``import
hasten`` free of optional packages. Code that needs an optional package
imports it inside the function that uses it, right after one call to
:func:`require`, whose ``ImportError`` names the pip extra that installs it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import torch
from packaging.version import Version

# Import name -> distribution name, where they differ.
_DISTRIBUTIONS = {
    "torch_xla": "torch_xla",
    "torch_npu": "torch_npu",
    "intel_extension_for_pytorch": "intel_extension_for_pytorch",
    "megatron": "megatron-core",
    "transformer_engine": "transformer-engine",
    "comet_ml": "comet-ml",
}

# Import name -> other distributions that provide it (a light build, say), tried after the main one.
_ALTERNATIVES = {
    "mlflow": ("mlflow-skinny",),
}

# Import name -> the hasten extra that installs it.
_EXTRAS = {
    "deepspeed": "deepspeed",
    "bitsandbytes": "bnb",
    "transformers": "transformers",
    "tqdm": "progress",
    "rich": "progress",
    "torchao": "ao",
}


@cache
def package_version(name: str) -> str | None:
    """The installed version of the package imported as ``name``, or ``None`` when absent.

    Looks only at the import system and the installed metadata; never imports ``name``.
    """
    if not all(part.isidentifier() for part in name.split(".")):
        return None  # not a module name (a version string, say)
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):  # a parent package of a dotted name is missing
        return None
    for dist in (_DISTRIBUTIONS.get(name, name), name, name.replace("_", "-"), *_ALTERNATIVES.get(name, ())):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"  # importable without metadata (e.g. a source checkout on sys.path)


def _is_package_available(name: str) -> bool:
    return package_version(name) is not None


def require(package: str, *, extra: str | None = None, purpose: str | None = None) -> None:
    """Raise an ``ImportError`` that says how to install ``package`` when it is missing.

    Args:
        package: the import name of the optional package.
        extra: the hasten extra that installs it; defaults to the project's extra for that package.
        purpose: what the caller was trying to do, for the message.
    """
    if _is_package_available(package):
        return
    extra = extra if extra is not None else _EXTRAS.get(package)
    what = f"{purpose} needs" if purpose else "This feature needs"
    hint = (
        f"pip install 'hasten[{extra}]'" if extra else f"pip install {_DISTRIBUTIONS.get(package, package)}"
    )
    raise ImportError(
        f"{what} the optional package {package!r}, which is not installed. Install it with: {hint}"
    )


# --- optional packages -------------------------------------------------------------------------


def is_deepspeed_available() -> bool:
    """Whether DeepSpeed is installed."""
    return _is_package_available("deepspeed")


def is_bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed (same as :func:`is_bnb_available`)."""
    return is_bnb_available()


def is_transformers_available() -> bool:
    """Whether Hugging Face transformers is installed."""
    return _is_package_available("transformers")


def is_safetensors_available() -> bool:
    """Whether safetensors is installed (always true: it is a dependency of hasten)."""
    return _is_package_available("safetensors")


def is_rich_available() -> bool:
    """Whether rich is installed, for tables and progress bars."""
    return _is_package_available("rich")


def is_tqdm_available() -> bool:
    """Whether tqdm is installed, for progress bars."""
    return _is_package_available("tqdm")


def is_tensorboard_available() -> bool:
    """Whether tensorboard (or tensorboardX) is installed."""
    return _is_package_available("tensorboard") or _is_package_available("tensorboardX")


def is_wandb_available() -> bool:
    """Whether Weights & Biases is installed."""
    return _is_package_available("wandb")


def is_mlflow_available() -> bool:
    """Whether MLflow is installed (``mlflow`` or the lighter ``mlflow-skinny``)."""
    return _is_package_available("mlflow")


def is_comet_ml_available() -> bool:
    """Whether Comet ML is installed."""
    return _is_package_available("comet_ml")


def is_aim_available() -> bool:
    """Whether Aim is installed."""
    return _is_package_available("aim")


def is_clearml_available() -> bool:
    """Whether ClearML is installed."""
    return _is_package_available("clearml")


def is_dvclive_available() -> bool:
    """Whether DVCLive is installed."""
    return _is_package_available("dvclive")


def is_swanlab_available() -> bool:
    """Whether SwanLab is installed."""
    return _is_package_available("swanlab")


def is_trackio_available() -> bool:
    """Whether Trackio is installed."""
    return _is_package_available("trackio")


def is_torchao_available() -> bool:
    """Whether torchao is installed."""
    return _is_package_available("torchao")


def is_transformer_engine_available() -> bool:
    """Whether NVIDIA Transformer Engine is installed."""
    return _is_package_available("transformer_engine")


def is_msamp_available() -> bool:
    """Whether MS-AMP is installed."""
    return _is_package_available("msamp")


def is_megatron_lm_available() -> bool:
    """Whether Megatron-LM (``megatron``) is installed."""
    return _is_package_available("megatron")


def is_torchdata_available() -> bool:
    """Whether torchdata is installed."""
    return _is_package_available("torchdata")


def is_torchdata_stateful_dataloader_available() -> bool:
    """Whether torchdata's ``StatefulDataLoader`` is available (torchdata >= 0.8.0)."""
    version = package_version("torchdata")
    if version is None:
        return False
    return version == "unknown" or Version(version).release >= (0, 8, 0)


def is_ipex_available() -> bool:
    """Whether Intel Extension for PyTorch is installed."""
    return _is_package_available("intel_extension_for_pytorch")


# --- accelerators ------------------------------------------------------------------------------


@cache
def is_cuda_available() -> bool:
    """Whether a CUDA device is usable."""
    return torch.cuda.is_available()


@cache
def is_mps_available(min_version: str = "1.12") -> bool:
    """Whether Apple's Metal Performance Shaders backend is usable with torch >= ``min_version``."""

    backend = getattr(torch.backends, "mps", None)
    if backend is None or Version(torch.__version__.split("+")[0]) < Version(min_version):
        return False
    return bool(backend.is_built() and backend.is_available())


@cache
def is_xpu_available(check_device: bool = False) -> bool:
    """Whether an Intel XPU is usable; with ``check_device``, also that one can be selected."""
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return False
    if check_device:
        try:
            _ = torch.xpu.device_count()
        except RuntimeError:
            return False
    return True


@cache
def is_npu_available(check_device: bool = False) -> bool:
    """Whether an Ascend NPU is usable (needs ``torch_npu``, imported only when installed)."""
    if not _is_package_available("torch_npu"):
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return False
    if check_device:
        try:
            _ = npu.device_count()
        except RuntimeError:
            return False
    return True


@cache
def is_torch_xla_available(check_is_tpu: bool = False, check_is_gpu: bool = False) -> bool:
    """Whether torch_xla is installed; with a check flag, also that it drives a TPU or GPU."""
    if not _is_package_available("torch_xla"):
        return False
    if not (check_is_tpu or check_is_gpu):
        return True
    import torch_xla.runtime as xr  # only imported when the caller asks about the device kind

    kind = xr.device_type()
    return (check_is_tpu and kind == "TPU") or (check_is_gpu and kind in ("GPU", "CUDA"))


def is_bf16_available(ignore_tpu: bool = False) -> bool:
    """Whether bfloat16 compute is supported on the default accelerator (or the CPU when none)."""
    if is_torch_xla_available(check_is_tpu=True):
        return not ignore_tpu
    if is_cuda_available():
        return bool(torch.cuda.is_bf16_supported())
    return True


# --- the rest of Accelerate's probes -------------------------------------------------------------
# Same names and arguments as ``accelerate.utils.imports``; like the probes above they only look.


def _version_at_least(name: str, minimum: str | None) -> bool:
    from packaging.version import InvalidVersion

    found = package_version(name)
    if found is None:
        return False
    if minimum is None:
        return True
    try:
        return Version(found) >= Version(minimum)
    except InvalidVersion:  # "unknown" (a source checkout): present, version not known
        return True


def is_bnb_available(min_version: str | None = None) -> bool:
    """Whether bitsandbytes is installed (at ``min_version`` or newer when given)."""
    return _version_at_least("bitsandbytes", min_version)


def is_4bit_bnb_available() -> bool:
    """Whether the installed bitsandbytes quantizes to 4 bits (0.39.0 or newer)."""
    return _version_at_least("bitsandbytes", "0.39.0")


def is_8bit_bnb_available() -> bool:
    """Whether the installed bitsandbytes quantizes to 8 bits (0.37.2 or newer)."""
    return _version_at_least("bitsandbytes", "0.37.2")


def is_bitsandbytes_multi_backend_available() -> bool:
    """Whether bitsandbytes runs on more than CUDA (0.44 and newer ship the CPU/XPU backends)."""
    return _version_at_least("bitsandbytes", "0.44.0")


def is_numpy_available(min_version: str = "1.25.0") -> bool:
    """Whether numpy ``min_version`` or newer is installed."""
    return _version_at_least("numpy", min_version)


def _simple_probe(module: str, what: str) -> Callable[[], bool]:
    def probe() -> bool:
        return _is_package_available(module)

    probe.__doc__ = f"Whether {what} is installed."
    return probe


is_boto3_available = _simple_probe("boto3", "boto3 (SageMaker uploads)")
is_datasets_available = _simple_probe("datasets", "Hugging Face datasets")
is_import_timer_available = _simple_probe("import_timer", "import_timer")
is_lomo_available = _simple_probe("lomo_optim", "lomo_optim (the LOMO optimizers)")
is_matplotlib_available = _simple_probe("matplotlib", "matplotlib")
is_pandas_available = _simple_probe("pandas", "pandas")
is_peft_available = _simple_probe("peft", "Hugging Face PEFT")
is_pytest_available = _simple_probe("pytest", "pytest")
is_sagemaker_available = _simple_probe("sagemaker", "the SageMaker SDK")
is_schedulefree_available = _simple_probe("schedulefree", "schedulefree")
is_timm_available = _simple_probe("timm", "timm")
is_torchvision_available = _simple_probe("torchvision", "torchvision")
is_amdsmi_available = _simple_probe("amdsmi", "amdsmi (AMD GPU management)")


def is_pynvml_available() -> bool:
    """Whether pynvml (or nvidia-ml-py, which provides it) is installed."""
    return _is_package_available("pynvml")


def is_triton_available() -> bool:
    """Whether Triton is installed."""
    return _is_package_available("triton")


def is_torch_distributed_available() -> bool:
    """Whether this torch build has ``torch.distributed``."""
    return bool(torch.distributed.is_available())


def is_weights_only_available() -> bool:
    """Whether ``torch.load(weights_only=True)`` takes an allow-list (torch 2.4 and newer: always here)."""
    return hasattr(torch.serialization, "add_safe_globals")


def is_xccl_available() -> bool:
    """Whether this torch build has the XCCL backend (Intel GPUs)."""
    check = getattr(torch.distributed.distributed_c10d, "is_xccl_available", None)
    return bool(check()) if check is not None else False


def is_pippy_available() -> bool:
    """Whether ``torch.distributed.pipelining`` (pipeline parallelism, torch 2.4 and newer) is present."""
    return package_version("torch.distributed.pipelining") is not None


def is_rocm_available() -> bool:
    """Whether this is a ROCm build of torch with a usable AMD GPU."""
    return torch.version.hip is not None and is_cuda_available()


def is_fp8_available() -> bool:
    """Whether an FP8 backend (MS-AMP, TransformerEngine or torchao) is installed."""
    return is_msamp_available() or is_transformer_engine_available() or is_torchao_available()


def is_transformer_engine_mxfp8_available() -> bool:
    """Whether TransformerEngine is installed and the GPU supports MXFP8 (asks TransformerEngine)."""
    if not is_transformer_engine_available():
        return False
    from transformer_engine.pytorch.fp8 import check_mxfp8_support  # only with TE installed

    return bool(check_mxfp8_support()[0])


def _device_module_available(package: str, device: str, check_device: bool) -> bool:
    """Whether the out-of-tree backend ``package`` is installed and registers a usable ``torch.<device>``.

    The backend is imported only when installed (importing it is what registers the device).
    """
    if not _is_package_available(package):
        return False
    importlib.import_module(package)
    module = getattr(torch, device, None)
    if module is None:
        return False
    try:
        if check_device:
            _ = module.device_count()
        return bool(module.is_available())
    except RuntimeError:
        return False


@cache
def is_mlu_available(check_device: bool = False) -> bool:
    """Whether a Cambricon MLU is usable (needs ``torch_mlu``)."""
    return _device_module_available("torch_mlu", "mlu", check_device)


@cache
def is_musa_available(check_device: bool = False) -> bool:
    """Whether a Moore Threads MUSA device is usable (needs ``torch_musa``)."""
    return _device_module_available("torch_musa", "musa", check_device)


@cache
def is_sdaa_available(check_device: bool = False) -> bool:
    """Whether a Tecorigin SDAA device is usable (needs ``torch_sdaa``)."""
    return _device_module_available("torch_sdaa", "sdaa", check_device)


@cache
def is_neuron_available(check_device: bool = False) -> bool:
    """Whether an AWS Neuron device is usable (needs ``torch_neuronx``)."""
    return _device_module_available("torch_neuronx", "neuron", check_device)


@cache
def is_hpu_available(init_hccl: bool = False) -> bool:
    """Whether an Intel Gaudi HPU is usable (needs ``habana_frameworks``); ``init_hccl`` also loads its
    collectives."""
    if package_version("habana_frameworks.torch") is None:
        return False
    importlib.import_module("habana_frameworks.torch")
    if init_hccl:
        importlib.import_module("habana_frameworks.torch.distributed.hccl")
    module = getattr(torch, "hpu", None)
    return bool(module is not None and module.is_available())


def is_habana_gaudi1() -> bool:
    """Whether the HPU present is a first-generation Gaudi (which has no fp16)."""
    if not is_hpu_available():
        return False
    experimental = importlib.import_module("habana_frameworks.torch.utils.experimental")
    return bool(experimental._get_device_type() == experimental.synDeviceType.synDeviceGaudi)


def is_fp16_available() -> bool:
    """Whether float16 compute is supported (everywhere but first-generation Gaudi)."""
    return not is_habana_gaudi1()


F = TypeVar("F", bound=Callable[..., Any])


def torchao_required(func: F) -> F:
    """Decorator: calling ``func`` without torchao raises an ``ImportError`` saying how to install it."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        require("torchao", purpose=f"{func.__qualname__}()")
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def deepspeed_required(func: F) -> F:
    """Decorator: calling ``func`` while an ``AcceleratorState`` exists that is not set up for DeepSpeed
    raises ``ValueError``.

    The state lives above this module, so it is looked up in ``sys.modules``: when ``hasten.state`` was
    never imported, no state exists and there is nothing to contradict.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state_module = sys.modules.get("hasten.state")
        state_class = getattr(state_module, "AcceleratorState", None)
        if state_class is not None and state_class._accelerator is not None:
            kind = state_class._accelerator.distributed_type
            if str(kind) != "DEEPSPEED":
                raise ValueError(
                    f"{func.__qualname__}() needs DeepSpeed, but the AcceleratorState of this process runs "
                    f"distributed_type={str(kind)!r}. Configure the Accelerator for DeepSpeed (a "
                    "DeepSpeedPlugin or `hasten launch --use_deepspeed`) before calling it."
                )
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
