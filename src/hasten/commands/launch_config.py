"""``hasten launch`` settings from a launch config file, each value checked as its flag checks it.

A config file written by ``accelerate config`` or ``hasten config`` holds the flags' names as keys
(flat, or in the ``fsdp_config`` / ``deepspeed_config`` / ``dynamo_config`` / ``parallelism_config``
sections). Each value
goes through its flag's converter and choices, so ``mixed_precision: fp64`` is the error the flag
``--mixed_precision fp64`` would be. A key that is neither a flag nor one of the other keys
Accelerate writes warns, naming the closest known key.
"""

from __future__ import annotations

import argparse
import difflib
import warnings
from collections.abc import Callable
from typing import Any, cast

from hasten.utils.config_file import load_config_file
from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.environment import str_to_bool
from hasten.utils.errors import ConfigurationError
from hasten.utils.typing import PathLike

SECTIONS = ("fsdp_config", "deepspeed_config", "dynamo_config", "parallelism_config")
# Keys Accelerate's config files hold that hasten launch does not use, with the values that change
# nothing (any other value warns that it is ignored).
UNUSED_KEYS: dict[str, tuple[Any, ...]] = {
    "compute_environment": ("LOCAL_MACHINE",),
    "main_training_function": ("main",),
    "enable_cpu_affinity": (False,),
    "downcast_bf16": (False, "no"),
    "tpu_use_cluster": (False,),
    "tpu_use_sudo": (False,),
    "tpu_name": (),
    "tpu_zone": (),
    "tpu_vm": (),
    "tpu_env": (),
    "command_file": (),
    "commands": (),
    "megatron_lm_config": (),
    "mpirun_config": (),
    "ipex_config": (),
    "fp8_config": (),
}
# Keys read here rather than through a flag of the same name.
READ_HERE = ("distributed_type", "use_cpu")
_NOT_SETTINGS = ("config_file", "training_script", "training_script_args", "help", "module", "no_python")


def boolean(value: str) -> bool:
    """A boolean flag's value, read by :func:`~hasten.utils.environment.str_to_bool`."""
    return str_to_bool(value, to_bool=True)


def _flag_type_name(action: argparse.Action) -> str:
    if action.type is None:
        return "a single value"
    return {"int": "an integer", "float": "a number", "boolean": "true or false"}.get(
        getattr(action.type, "__name__", ""), "a single value"
    )


def convert(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from a config file, converted and checked by the flag ``action`` as it would be on the
    command line.

    Raises:
        ConfigurationError: the value is not of the flag's type or not one of its choices.
    """
    key = action.dest
    switch = isinstance(action, argparse._StoreConstAction)  # a flag given or not, such as --cpu
    converter = boolean if switch else cast(Callable[[str], Any], action.type or str)
    text = value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        text = ",".join(value)  # a list of class names, as the comma-separated flag takes them
    try:
        if isinstance(text, (dict, list)):
            raise TypeError
        converted = converter(str(text))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        expected = "true or false" if switch else _flag_type_name(action)
        raise ConfigurationError(
            f"{where}: {key}={value!r} is not valid; --{key} takes {expected}."
        ) from None
    if switch:
        return True if converted else None  # false: as if the flag were not given
    if action.choices is not None and converted not in action.choices:
        raise ConfigurationError(
            f"{where}: {key}={value!r} is not valid; --{key} takes one of {list(action.choices)}."
        )
    return converted


def settings_from_config_file(path: PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The launch settings a config file gives, by flag name, each converted and checked by its flag.

    Raises:
        ConfigurationError: a value is not valid for its flag (or ``distributed_type`` / ``use_cpu``).
    """
    where = f"config file {str(path)!r}"
    config = load_config_file(path)
    flat = {key: value for key, value in config.items() if key not in SECTIONS}
    for section in SECTIONS:
        if isinstance(config.get(section), dict):
            flat.update(config[section])
    actions = {action.dest: action for action in parser._actions if action.dest not in _NOT_SETTINGS}
    known = [*actions, *SECTIONS, *UNUSED_KEYS, *READ_HERE]
    settings: dict[str, Any] = {}
    for key, value in flat.items():
        if key in actions:
            if value is not None:
                settings[key] = convert(actions[key], value, where)
        elif key in UNUSED_KEYS:
            if value not in (None, {}, [], *UNUSED_KEYS[key]):
                warnings.warn(
                    f"{where}: {key}={value!r} is not used by hasten launch; ignored.", stacklevel=2
                )
        elif key not in READ_HERE:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            warnings.warn(f"{where}: unknown key {key!r} ignored{hint}", stacklevel=2)
    if config.get("use_cpu") is not None and "cpu" not in settings:
        settings["cpu"] = convert(actions["cpu"], config["use_cpu"], where)
    if config.get("parallelism_config"):
        settings.setdefault("use_parallelism_config", True)
    if config.get("distributed_type") is not None:
        kind = DistributedType.parse(config["distributed_type"], f"{where}: distributed_type")
        settings.setdefault("use_fsdp", kind == DistributedType.FSDP or None)
        settings.setdefault("use_deepspeed", kind == DistributedType.DEEPSPEED or None)
    return {key: value for key, value in settings.items() if value is not None}
