"""``hasten env``: what a bug report needs, ready to paste."""

from __future__ import annotations

import platform
import sys

import psutil
import torch

from hasten.utils.config_file import default_config_file, load_config_file
from hasten.utils.device import accelerator_count, accelerator_type
from hasten.utils.imports import package_version

OPTIONAL = [
    "accelerate",
    "transformers",
    "safetensors",
    "numpy",
    "deepspeed",
    "bitsandbytes",
    "tqdm",
    "rich",
    "tensorboard",
    "wandb",
    "mlflow",
    "torch_xla",
]


def environment_report() -> dict[str, str]:
    """The facts ``hasten env`` prints, as a dict."""
    kind = accelerator_type()
    report = {
        "hasten version": package_version("hasten") or "unknown",
        "Platform": platform.platform(),
        "Python version": sys.version.split()[0],
        "PyTorch version": torch.__version__,
        "Accelerator": "none (CPU only)" if kind == "cpu" else f"{accelerator_count(kind)} x {kind}",
        "System RAM": f"{psutil.virtual_memory().total / 2**30:.2f} GiB",
        "CPU cores": str(psutil.cpu_count(logical=True)),
    }
    for name in OPTIONAL:
        version = package_version(name)
        if version is not None:
            report[f"{name} version"] = version
    return report


def env_command() -> int:
    print("Copy-and-paste the text below in your GitHub issue\n")
    for key, value in environment_report().items():
        print(f"- {key}: {value}")
    path = default_config_file()
    if path.exists():
        print(f"- Default config file ({path}):")
        for key, value in load_config_file(path).items():
            print(f"\t- {key}: {value}")
    else:
        print(f"- Default config file: none at {path}")
    return 0
