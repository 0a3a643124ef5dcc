"""The launch configuration file that ``accelerate config`` and ``hasten config`` write.

Same location, same keys and same formats (YAML or JSON) as Accelerate, so a
file written by either tool is read by both.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from hasten.utils.atomic import atomic_write
from hasten.utils.dataclasses.enums import ComputeEnvironment, DistributedType, PrecisionType
from hasten.utils.device import accelerator_count, accelerator_type
from hasten.utils.typing import PathLike


def cache_dir() -> Path:
    """Where Accelerate keeps its config: ``$HF_HOME/accelerate`` (``~/.cache/huggingface/accelerate``)."""
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "accelerate"


def default_config_file() -> Path:
    """The default config file: ``default_config.yaml`` in :func:`cache_dir`."""
    return cache_dir() / "default_config.yaml"


def _distributed_defaults() -> dict[str, Any]:
    kind = accelerator_type()
    count = accelerator_count(kind)
    multi = {"cuda": DistributedType.MULTI_GPU, "xpu": DistributedType.MULTI_XPU, "npu": DistributedType.MULTI_NPU}
    if kind in multi and count > 1:
        return {"distributed_type": multi[kind].value, "num_processes": count, "gpu_ids": "all", "use_cpu": False}
    return {"distributed_type": DistributedType.NO.value, "num_processes": 1, "use_cpu": kind == "cpu"}


def basic_config(mixed_precision: str = "no") -> dict[str, Any]:
    """The settings ``write_basic_config`` writes for this machine, as a dict."""
    precision = PrecisionType.parse(mixed_precision, "mixed_precision")
    config: dict[str, Any] = {
        "compute_environment": ComputeEnvironment.LOCAL_MACHINE.value,
        "debug": False,
        "downcast_bf16": False,
        "enable_cpu_affinity": False,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": precision.value,
        "num_machines": 1,
        "rdzv_backend": "static",
        "same_network": False,
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    config.update(_distributed_defaults())
    return dict(sorted(config.items()))


def save_config_file(config: dict[str, Any], path: PathLike) -> Path:
    """Write ``config`` atomically, as JSON when ``path`` ends in ``.json`` and as YAML otherwise."""
    target = Path(path)
    with atomic_write(target, "w", encoding="utf-8") as handle:
        if target.suffix == ".json":
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")
        else:
            yaml.safe_dump(config, handle, sort_keys=True)
    return target


def write_basic_config(mixed_precision: str = "no", save_location: PathLike | None = None) -> Path | bool:
    """Write a config file for this machine with every other setting at its default.

    Detects the accelerators present (several GPUs mean one process per GPU; no
    accelerator means the CPU). Refuses to replace an existing file.

    Args:
        mixed_precision: ``"no"``, ``"fp16"``, ``"bf16"`` or ``"fp8"``.
        save_location: where to write; the default config file when ``None``.

    Returns:
        The path written, or ``False`` when a file was already there (a warning says so).

    Raises:
        ValueError: ``mixed_precision`` is not one of the accepted values.
    """
    config = basic_config(mixed_precision)
    path = Path(save_location) if save_location is not None else default_config_file()
    if path.exists():
        warnings.warn(
            f"A config file already exists at {path}; it was left unchanged. Delete it or pass another "
            "`save_location` to write a new one.",
            stacklevel=2,
        )
        return False
    return save_config_file(config, path)
