"""A DeepSpeed configuration dictionary, read from a dict, a JSON file, JSON text or base64 JSON, and queried
by dotted key."""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
from typing import Any

from hasten.utils.errors import ConfigurationError


def _load(config_file_or_dict: Any) -> dict[str, Any]:
    if isinstance(config_file_or_dict, dict):
        return copy.deepcopy(config_file_or_dict)  # the caller's dict keeps its "auto" values
    if not isinstance(config_file_or_dict, (str, os.PathLike)):
        raise ConfigurationError(
            f"hf_ds_config={config_file_or_dict!r} is not a DeepSpeed config; pass a dict, the path of a "
            "JSON "
            "file, JSON text, or base64-encoded JSON."
        )
    text = os.fspath(config_file_or_dict)
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as file:
            try:
                loaded = json.load(file)
            except json.JSONDecodeError as error:
                raise ConfigurationError(
                    f"hf_ds_config={text!r}: the file is not valid JSON ({error})."
                ) from None
    elif text.endswith(".json") or os.sep in text:
        raise ConfigurationError(
            f"hf_ds_config={text!r}: no such file (relative paths are read from {os.getcwd()!r}). "
            "Check the path, or pass the configuration as a dict or JSON text."
        )
    elif text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigurationError(f"hf_ds_config={text[:80]!r} is not valid JSON ({error}).") from None
    else:
        try:
            loaded = json.loads(base64.urlsafe_b64decode(text.encode()).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ConfigurationError(
                f"hf_ds_config={text!r} is neither an existing file nor JSON text nor base64-encoded JSON. "
                "Check the path (it is read relative to the current directory "
                f"{os.getcwd()!r}), or pass the configuration as a dict."
            ) from None
    if not isinstance(loaded, dict):
        raise ConfigurationError(
            f"hf_ds_config={text[:80]!r} holds a {type(loaded).__name__}, not a JSON object."
        )
    return loaded


class HfDeepSpeedConfig:
    """A DeepSpeed configuration and quick questions about it (ZeRO stage, offload).

    Args:
        config_file_or_dict: a dict (copied), the path of a JSON file, JSON text, or base64-encoded JSON.
    """

    def __init__(self, config_file_or_dict: Any) -> None:
        self.config: dict[str, Any] = _load(config_file_or_dict)
        self.set_stage_and_offload()

    def set_stage_and_offload(self) -> None:
        """Re-read the ZeRO stage and whether anything is offloaded (after the config changed)."""
        self._stage = self.get_value("zero_optimization.stage", -1)
        devices = {
            self.get_value("zero_optimization.offload_optimizer.device"),
            self.get_value("zero_optimization.offload_param.device"),
        }
        self._offload = (self.is_zero2() or self.is_zero3()) and bool(devices & {"cpu", "nvme"})

    def find_config_node(self, ds_key_long: str) -> tuple[dict[str, Any] | None, str]:
        """The dict holding the dotted key ``ds_key_long`` (``None`` when a parent is missing), and its last
        part."""
        *parents, key = ds_key_long.split(".")
        node: Any = self.config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                return None, key
        return (node if isinstance(node, dict) else None), key

    def get_value(self, ds_key_long: str, default: Any = None) -> Any:
        """The value at the dotted key, or ``default``."""
        node, key = self.find_config_node(ds_key_long)
        return default if node is None else node.get(key, default)

    def del_config_sub_tree(self, ds_key_long: str, must_exist: bool = False) -> None:
        """Remove the entry at the dotted key; with ``must_exist``, raise when it is absent."""
        node, key = self.find_config_node(ds_key_long)
        if node is None or key not in node:
            if must_exist:
                raise ConfigurationError(f"The DeepSpeed config has no entry {ds_key_long!r} to delete.")
            return
        del node[key]

    def is_true(self, ds_key_long: str) -> bool:
        """Whether the key is set to a true value (``False`` when unset)."""
        value = self.get_value(ds_key_long)
        return False if value is None else bool(value)

    def is_false(self, ds_key_long: str) -> bool:
        """Whether the key is set to a false value (``False`` when unset)."""
        value = self.get_value(ds_key_long)
        return False if value is None else not bool(value)

    def is_zero2(self) -> bool:
        """ZeRO stage 2."""
        return bool(self._stage == 2)

    def is_zero3(self) -> bool:
        """ZeRO stage 3."""
        return bool(self._stage == 3)

    def is_offload(self) -> bool:
        """Stage 2 or 3 with the optimizer or the parameters offloaded to CPU or NVMe."""
        return self._offload
