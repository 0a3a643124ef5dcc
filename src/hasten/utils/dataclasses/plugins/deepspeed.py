"""DeepSpeed settings: the plugin's fields, the environment, and an optional config, merged into one config
dict.

Fields left unset are read from the ``ACCELERATE_DEEPSPEED_*`` variables ``accelerate
launch`` sets. With ``hf_ds_config`` (a dict, a JSON path, JSON text; also
``ACCELERATE_DEEPSPEED_CONFIG_FILE``), the config is the authority: its ``"auto"``
entries are filled from the plugin's fields, a field passed explicitly that contradicts
a value in the config is an error, and the other fields take the config's values. The
result is :attr:`DeepSpeedPlugin.deepspeed_config`, the dict ``deepspeed.initialize``
takes once :meth:`DeepSpeedPlugin.deepspeed_config_process` has filled the remaining
``"auto"`` values from the training set-up (batch sizes, optimizer, scheduler).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from hasten.utils.constants import launch_variables
from hasten.utils.dataclasses._env import (
    env_field,
    one_of,
    or_auto,
    parse_field,
    positive_int,
    read_env,
    resolve_fields,
    to_bool,
    to_float,
)
from hasten.utils.dataclasses.plugins.deepspeed_config import HfDeepSpeedConfig
from hasten.utils.errors import ConfigurationError

_ZERO_STAGES = (0, 1, 2, 3)
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")
_ENV = "ACCELERATE_DEEPSPEED_"
_LAUNCH = launch_variables("DeepSpeedPlugin")  # field -> the variable `hasten launch` writes

# Plugin field -> the dotted key it fills in the DeepSpeed config.
_CONFIG_KEYS = {
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "gradient_clipping",
    "zero_stage": "zero_optimization.stage",
    "offload_optimizer_device": "zero_optimization.offload_optimizer.device",
    "offload_param_device": "zero_optimization.offload_param.device",
    "offload_param_nvme_path": "zero_optimization.offload_param.nvme_path",
    "offload_optimizer_nvme_path": "zero_optimization.offload_optimizer.nvme_path",
    "zero3_save_16bit_model": "zero_optimization.stage3_gather_16bit_weights_on_model_save",
}
# Launcher settings that a DeepSpeed config file replaces (ACCELERATE_CONFIG_DS_FIELDS names them).
_REPLACED_BY_CONFIG_FILE = [
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_param_nvme_path",
    "offload_optimizer_nvme_path",
    "zero3_save_16bit_model",
    "mixed_precision",
]


def _zero_stage(value: Any, name: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or value not in _ZERO_STAGES:
        raise ConfigurationError(
            f"{name}={value!r} is not a ZeRO stage; expected one of {list(_ZERO_STAGES)}."
        )
    return int(value)


def _path(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{name}={value!r} must be a path (a string), or 'none'.")
    return value


@dataclass
class DeepSpeedPlugin:
    """How to train with DeepSpeed (ZeRO stage, offload, clipping, accumulation, or a full DeepSpeed config).

    Args:
        hf_ds_config: a DeepSpeed config as a dict, a JSON file path, JSON text or an
            :class:`HfDeepSpeedConfig`; ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` when unset.
        gradient_accumulation_steps: ``"auto"`` (the ``Accelerator`` decides) or a positive int.
        gradient_clipping: the gradient norm to clip to, or ``"auto"``.
        zero_stage: ZeRO stage 0, 1, 2 or 3 (default 2).
        is_train_batch_min: with train and eval loaders, take the train batch size from the smaller.
        offload_optimizer_device: ``"none"``, ``"cpu"`` or ``"nvme"`` (ZeRO 2 and 3).
        offload_param_device: ``"none"``, ``"cpu"`` or ``"nvme"`` (ZeRO 3).
        offload_optimizer_nvme_path: the NVMe folder for the optimizer state.
        offload_param_nvme_path: the NVMe folder for parameters.
        zero3_init_flag: build models sharded with ``deepspeed.zero.Init`` (ZeRO 3 only).
        zero3_save_16bit_model: gather 16-bit weights when saving under ZeRO 3.
        transformer_moe_cls_names: comma-separated MoE layer class names (ZeRO 3 leaf modules).
        enable_msamp: add MS-AMP FP8 to the config (``ACCELERATE_FP8_BACKEND=MSAMP``).
        msamp_opt_level: ``"O1"`` or ``"O2"``.
    """

    hf_ds_config: Any = env_field(_LAUNCH["hf_ds_config"], "none")
    gradient_accumulation_steps: int | str | None = env_field(
        _LAUNCH["gradient_accumulation_steps"], "auto", or_auto(positive_int)
    )
    gradient_clipping: float | str | None = env_field(_LAUNCH["gradient_clipping"], "auto", or_auto(to_float))
    zero_stage: int | None = env_field(_LAUNCH["zero_stage"], 2, _zero_stage)
    is_train_batch_min: bool = True
    offload_optimizer_device: str | None = env_field(
        _LAUNCH["offload_optimizer_device"], "none", one_of(_OFFLOAD_DEVICES)
    )
    offload_param_device: str | None = env_field(
        _LAUNCH["offload_param_device"], "none", one_of(_OFFLOAD_DEVICES)
    )
    offload_optimizer_nvme_path: str | None = env_field(_ENV + "OFFLOAD_OPTIMIZER_NVME_PATH", "none", _path)
    offload_param_nvme_path: str | None = env_field(_ENV + "OFFLOAD_PARAM_NVME_PATH", "none", _path)
    zero3_init_flag: bool | None = None
    zero3_save_16bit_model: bool | None = env_field(_LAUNCH["zero3_save_16bit_model"], False, to_bool)
    transformer_moe_cls_names: str | None = env_field(_LAUNCH["transformer_moe_cls_names"], None, _path)
    enable_msamp: bool | None = None
    msamp_opt_level: str | None = env_field("ACCELERATE_FP8_OPT_LEVEL", "O1", one_of(["O1", "O2"]))

    def __post_init__(self) -> None:
        passed = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        resolve_fields(self)
        if self.enable_msamp is None:
            self.enable_msamp = (read_env("ACCELERATE_FP8_BACKEND") or "").upper() == "MSAMP"
        self.enable_msamp = to_bool(self.enable_msamp, "enable_msamp")
        if isinstance(self.hf_ds_config, HfDeepSpeedConfig) or self.hf_ds_config != "none":
            self._merge_config(passed)
        else:
            self.hf_ds_config = HfDeepSpeedConfig(self._config_from_fields())
        self.deepspeed_config: dict[str, Any] = self.hf_ds_config.config
        self.deepspeed_config["steps_per_print"] = float("inf")  # keep DeepSpeed from printing on stdout
        self._resolve_zero3_init("zero3_init_flag" in passed)
        self._selected = False
        if self.enable_msamp and "msamp" not in self.deepspeed_config:
            if self.zero_stage == 3:
                raise ConfigurationError(
                    "enable_msamp=True does not work with zero_stage=3; use ZeRO stage 0, 1 or 2 with MS-AMP."
                )
            self.deepspeed_config["msamp"] = {"enabled": True, "opt_level": self.msamp_opt_level}

    def _config_from_fields(self) -> dict[str, Any]:
        def nvme(device: str | None, path: str | None) -> str | None:
            return path if device == "nvme" else None

        config: dict[str, Any] = {
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "zero_optimization": {
                "stage": self.zero_stage,
                "offload_optimizer": {
                    "device": self.offload_optimizer_device,
                    "nvme_path": nvme(self.offload_optimizer_device, self.offload_optimizer_nvme_path),
                },
                "offload_param": {
                    "device": self.offload_param_device,
                    "nvme_path": nvme(self.offload_param_device, self.offload_param_nvme_path),
                },
                "stage3_gather_16bit_weights_on_model_save": self.zero3_save_16bit_model,
            },
        }
        if self.gradient_clipping:
            config["gradient_clipping"] = self.gradient_clipping
        return config

    def _merge_config(self, passed: set[str]) -> None:
        """Fill the config's ``"auto"`` entries from the fields; explicit fields must agree with the rest."""
        if not isinstance(self.hf_ds_config, HfDeepSpeedConfig):
            self.hf_ds_config = HfDeepSpeedConfig(self.hf_ds_config)
        config = self.hf_ds_config
        config.config.setdefault("gradient_accumulation_steps", 1)
        if "zero_optimization" not in config.config:
            raise ConfigurationError(
                "The DeepSpeed config has no 'zero_optimization' section; add one, e.g. "
                '{"zero_optimization": {"stage": 2}}.'
            )
        from_launcher = [name for name in (read_env("ACCELERATE_CONFIG_DS_FIELDS") or "").split(",") if name]
        clashing = sorted(set(from_launcher) & set(_REPLACED_BY_CONFIG_FILE))
        if clashing:
            raise ConfigurationError(
                f"The launch config sets {clashing} as well as a DeepSpeed config file, which replaces them. "
                "Set these values in the DeepSpeed config file and remove them from the launch config."
            )
        mismatches = []
        from_config = {}
        for name, key in _CONFIG_KEYS.items():
            value, in_config = getattr(self, name), config.get_value(key)
            node, last = config.find_config_node(key)
            if in_config == "auto" and value != "auto":
                assert node is not None
                node[last] = value
            elif in_config is not None and in_config != "auto":
                # The config's values get the checks an argument gets (a stage of 7 is an error).
                assert node is not None
                node[last] = from_config[name] = parse_field(self, name, in_config, f"DeepSpeed config {key}")
                if name in passed and node[last] != value:
                    mismatches.append(f"{name}={value!r} but the config has {key}={in_config!r}")
        if mismatches:
            raise ConfigurationError(
                "DeepSpeedPlugin arguments contradict the DeepSpeed config:\n- "
                + "\n- ".join(mismatches)
                + "\n"
                "Remove the arguments, change the config, or set those config values to 'auto'."
            )
        config.set_stage_and_offload()
        for name, value in from_config.items():
            setattr(self, name, value)

    def _resolve_zero3_init(self, passed: bool) -> None:
        is_zero3 = self.hf_ds_config.is_zero3()
        if self.zero3_init_flag is None:
            raw = read_env(_LAUNCH["zero3_init_flag"])
            self.zero3_init_flag = (
                is_zero3
                if raw is None
                else to_bool(raw, f"environment variable {_LAUNCH['zero3_init_flag']}")
            )
        else:
            self.zero3_init_flag = to_bool(self.zero3_init_flag, "zero3_init_flag")
        if self.zero3_init_flag and not is_zero3:
            if passed:
                raise ConfigurationError(
                    f"zero3_init_flag=True needs ZeRO stage 3, but the stage is {self.zero_stage!r}; "
                    "pass zero_stage=3 or drop zero3_init_flag."
                )
            warnings.warn(
                f"{_LAUNCH['zero3_init_flag']} is set but the ZeRO stage is not 3; zero3_init_flag is False.",
                stacklevel=3,
            )
            self.zero3_init_flag = False

    # --- filling the config from the training set-up ------------------------------------------

    def fill_match(
        self, ds_key_long: str, mismatches: list[str] | None = None, must_match: bool = True, **kwargs: Any
    ) -> None:
        """Fill ``ds_key_long`` from ``kwargs`` when the config says ``"auto"``; else record a mismatch.

        Raises:
            ConfigurationError: the config says ``"auto"`` and ``kwargs`` has no value for the key.
        """
        mismatches = [] if mismatches is None else mismatches
        node, key = self.hf_ds_config.find_config_node(ds_key_long)
        if node is None:
            return
        if node.get(key) == "auto":
            if ds_key_long not in kwargs:
                raise ConfigurationError(
                    f"The DeepSpeed config sets {ds_key_long!r} to 'auto' but the training set-up gives no "
                    "value "
                    "for it; set it in the config."
                )
            node[key] = kwargs[ds_key_long]
            return
        if (
            must_match
            and ds_key_long in kwargs
            and node.get(key) is not None
            and node[key] != kwargs[ds_key_long]
        ):
            mismatches.append(
                f"- ds {ds_key_long}={node[key]!r} vs arg {ds_key_long}={kwargs[ds_key_long]!r}"
            )

    def is_auto(self, ds_key_long: str) -> bool:
        """Whether the config sets the dotted key to ``"auto"``."""
        return bool(self.hf_ds_config.get_value(ds_key_long) == "auto")

    def get_value(self, ds_key_long: str, default: Any = None) -> Any:
        """The config's value at the dotted key, or ``default``."""
        return self.hf_ds_config.get_value(ds_key_long, default)

    def deepspeed_config_process(
        self,
        prefix: str = "",
        mismatches: list[str] | None = None,
        config: dict[str, Any] | None = None,
        must_match: bool = True,
        **kwargs: Any,
    ) -> None:
        """Fill every ``"auto"`` value from ``kwargs`` (dotted keys); values set in the config must agree.

        Raises:
            ConfigurationError: a config value differs from the set-up's, listing each one.
        """
        mismatches = [] if mismatches is None else mismatches
        config = self.deepspeed_config if config is None else config
        for key, value in config.items():
            if isinstance(value, dict):
                self.deepspeed_config_process(f"{prefix}{key}.", mismatches, value, must_match, **kwargs)
            else:
                self.fill_match(prefix + key, mismatches, must_match=must_match, **kwargs)
        if mismatches and not prefix:
            raise ConfigurationError(
                "These DeepSpeed config values differ from the training set-up:\n"
                + "\n".join(mismatches)
                + "\n"
                "Set them to 'auto' in the config (or to the values shown after 'arg')."
            )

    def set_mixed_precision(self, mixed_precision: str) -> None:
        """Enable fp16 or bf16 (fp8 trains on bf16) in the config; refuse a config that enables the other."""
        config = self.deepspeed_config
        if mixed_precision == "fp16":
            config.setdefault("fp16", {"enabled": True, "auto_cast": True})
        elif mixed_precision in ("bf16", "fp8"):
            config.setdefault("bf16", {"enabled": True})
        if mixed_precision == "fp8" and self.enable_msamp:
            config.setdefault("msamp", {"enabled": True, "opt_level": self.msamp_opt_level})
        if mixed_precision != "no":
            other = "bf16" if mixed_precision == "fp16" else "fp16"
            if str(config.get(other, {}).get("enabled", "false")).lower() == "true":
                raise ConfigurationError(
                    f"mixed_precision={mixed_precision!r}, but the DeepSpeed config enables {other}; "
                    f"remove {other!r} from the config or choose mixed_precision={other!r}."
                )
        for dtype in ("fp16", "bf16"):
            config.setdefault(dtype, {"enabled": False})
        flags = {
            "fp16.enabled": mixed_precision == "fp16",
            "bf16.enabled": mixed_precision in ("bf16", "fp8"),
        }
        for key in flags:
            self.fill_match(key, None, False, **flags)

    def set_moe_leaf_modules(self, model: Any) -> None:
        """Under ZeRO-3, make the modules of the classes named in ``transformer_moe_cls_names`` ZeRO-3 leaves
        (their experts' parameters are gathered together, whatever order the router calls them in).

        Raises:
            ConfigurationError: a class name is not among the model's module classes.
        """
        if not self.transformer_moe_cls_names:
            return
        names = [name.strip() for name in self.transformer_moe_cls_names.split(",") if name.strip()]
        present = {type(module).__name__ for module in model.modules()}
        missing = [name for name in names if name not in present]
        if missing:
            raise ConfigurationError(
                f"transformer_moe_cls_names names {missing}, which the model does not contain; its module "
                f"classes are {sorted(present)}. Fix the names (they are case-sensitive)."
            )
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, names)

    def is_zero3_init_enabled(self) -> bool:
        """Whether models should be built sharded with ``deepspeed.zero.Init``."""
        return bool(self.zero3_init_flag)

    def select(self, _from_accelerator_state: bool = False) -> None:
        """Mark this plugin as the active one (called by ``AcceleratorState.select_deepspeed_plugin``)."""
        if not _from_accelerator_state:
            raise ConfigurationError(
                "Activate a DeepSpeedPlugin with AcceleratorState().select_deepspeed_plugin(key), not "
                "select()."
            )
        self._selected = True

    def _unselect(self) -> None:
        self._selected = False

    @property
    def selected(self) -> bool:
        """Whether this plugin is the active one."""
        return self._selected


def active_plugin(plugins: dict[str, DeepSpeedPlugin] | None) -> DeepSpeedPlugin | None:
    """The selected plugin of ``plugins`` (the first when none is selected), or ``None`` without plugins."""
    if not plugins:
        return None
    return next((plugin for plugin in plugins.values() if plugin.selected), next(iter(plugins.values())))


def named_plugin(plugins: dict[str, DeepSpeedPlugin] | None, name: str | None) -> DeepSpeedPlugin:
    """The plugin of ``plugins`` passed under ``name``.

    Raises:
        ConfigurationError: no plugin has that name.
    """
    plugins = plugins or {}
    if name not in plugins:
        raise ConfigurationError(
            f"No DeepSpeed plugin is named {name!r}; the Accelerator was given {sorted(plugins)}. Pass "
            "deepspeed_plugins={name: DeepSpeedPlugin(...), ...} to the first Accelerator."
        )
    return plugins[name]


def select_plugin(plugins: dict[str, DeepSpeedPlugin] | None, name: str | None) -> None:
    """Make the plugin passed under ``name`` the selected one of ``plugins`` (the others unselected).

    Raises:
        ConfigurationError: no plugin has that name.
    """
    chosen = named_plugin(plugins, name)
    for plugin in (plugins or {}).values():
        plugin._unselect()
    chosen.select(_from_accelerator_state=True)
