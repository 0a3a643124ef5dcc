"""Cached probes for optional packages and accelerators.

A probe only *looks*: it asks ``importlib`` where a package would be loaded
from and ``importlib.metadata`` for its version, and never imports it, so
calling every probe costs a few file-system lookups and keeps ``import
hasten`` free of optional packages. Code that needs an optional package
imports it inside the function that uses it, right after one call to
:func:`require`, whose ``ImportError`` names the pip extra that installs it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache

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

# Import name -> the hasten extra that installs it.
_EXTRAS = {
    "deepspeed": "deepspeed",
    "bitsandbytes": "bnb",
    "transformers": "transformers",
    "tqdm": "progress",
    "rich": "progress",
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
    for dist in (_DISTRIBUTIONS.get(name, name), name, name.replace("_", "-")):
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


def is_bnb_available() -> bool:
    """Whether bitsandbytes is installed."""
    return _is_package_available("bitsandbytes")


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
    """Whether MLflow is installed."""
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
    from packaging.version import Version

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
