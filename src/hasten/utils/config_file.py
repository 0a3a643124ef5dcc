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

from hasten.utils.atomic import atomic_write
from hasten.utils.dataclasses.enums import ComputeEnvironment, DistributedType, PrecisionType
from hasten.utils.device import accelerator_count, accelerator_type
from hasten.utils.errors import ConfigurationError
from hasten.utils.typing import PathLike


def cache_dir() -> Path:
    """Where Accelerate keeps its config: ``$HF_HOME/accelerate`` (``~/.cache/huggingface/accelerate``)."""
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "accelerate"


def default_config_file() -> Path:
    """The default config file: ``default_config.yaml`` in :func:`cache_dir`."""
    return cache_dir() / "default_config.yaml"


def _distributed_defaults() -> dict[str, Any]:
    kind = accelerator_type()
    count = accelerator_count(kind)
    multi = {
        "cuda": DistributedType.MULTI_GPU,
        "xpu": DistributedType.MULTI_XPU,
        "npu": DistributedType.MULTI_NPU,
    }
    if kind in multi and count > 1:
        return {
            "distributed_type": multi[kind].value,
            "num_processes": count,
            "gpu_ids": "all",
            "use_cpu": False,
        }
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
    import yaml  # here, not at module level: `import hasten` does not pay for it

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
        ValueError: ``mixed_precision`` is not one of the accepted values, or ``save_location`` is a
            directory.
    """
    config = basic_config(mixed_precision)
    path = Path(save_location) if save_location is not None else default_config_file()
    if path.is_dir():
        raise ConfigurationError(
            f"save_location={str(save_location)!r} is a directory; pass the path of the file to write, "
            f"such as {str(path / default_config_file().name)!r}."
        )
    if path.exists():
        warnings.warn(
            f"A config file already exists at {path}; it was left unchanged. Delete it or pass another "
            "`save_location` to write a new one.",
            stacklevel=2,
        )
        return False
    return save_config_file(config, path)


# Keys older Accelerate releases wrote under other names (old name -> current name), per section.
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "fsdp_config": {
        "fsdp_backward_prefetch_policy": "fsdp_backward_prefetch",
        "fsdp_transformer_layer_cls_to_wrap_names": "fsdp_transformer_layer_cls_to_wrap",
    },
    "": {"fp16": "mixed_precision"},
}


def load_config_file(path: PathLike) -> dict[str, Any]:
    """Read a launch config written by ``accelerate config`` or ``hasten config`` (YAML or JSON).

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is not valid YAML/JSON or does not hold a mapping (naming the file).
    """
    import yaml  # here, not at module level: `import hasten` does not pay for it

    target = Path(path)
    text = target.read_text(encoding="utf-8")
    try:
        loaded = json.loads(text) if target.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(
            f"config file {str(target)!r} is not valid {target.suffix.lstrip('.') or 'YAML'}: {error}"
        ) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"config file {str(target)!r} must hold a mapping of settings, not {type(loaded).__name__}"
        )
    return _renamed(loaded)


def _renamed(config: dict[str, Any]) -> dict[str, Any]:
    result = dict(config)
    for section, renames in RENAMED_KEYS.items():
        table = result if not section else result.get(section)
        if not isinstance(table, dict):
            continue
        for old, new in renames.items():
            if old in table and new not in table:
                value = table.pop(old)
                table[new] = ("fp16" if value is True else "no") if old == "fp16" else value
    return result


def update_config_file(path: PathLike | None = None) -> Path:
    """Bring a config file to the current keys: old names renamed, missing keys added with their
    defaults, every existing value kept. Written back in its own format, crash-safely."""
    target = Path(path) if path is not None else default_config_file()
    if not target.exists():
        raise FileNotFoundError(f"no config file at {target}; create one with `hasten config default`")
    config = load_config_file(target)
    current = basic_config(str(config.get("mixed_precision", "no")))
    for key, value in current.items():
        config.setdefault(key, value)
    return save_config_file(dict(sorted(config.items())), target)
