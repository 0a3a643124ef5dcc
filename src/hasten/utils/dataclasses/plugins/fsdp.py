"""Fully Sharded Data Parallel settings for FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``).

Every field left unset is read from the ``FSDP_*`` variable ``accelerate launch`` sets
for it. Values are converted once, to the torch objects the chosen FSDP version takes
(``ShardingStrategy``, ``CPUOffload`` / ``OffloadPolicy``, ``MixedPrecision`` /
``MixedPrecisionPolicy``, ``StateDictType``, a wrap policy), so a bad name fails when the
plugin is built, with the accepted names. :meth:`FullyShardedDataParallelPlugin.wrap`
applies them to a model with the real ``torch.distributed.fsdp`` API.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hasten.utils.constants import (
    FSDP2_STATE_DICT_TYPE,
    FSDP_AUTO_WRAP_POLICY,
    FSDP_SHARDING_STRATEGY,
    launch_variables,
)
from hasten.utils.dataclasses._env import (
    comma_list,
    env_field,
    is_set_in_env,
    non_negative_int,
    one_of,
    read_env,
    resolve_fields,
    to_bool,
)
from hasten.utils.device import accelerator_type
from hasten.utils.errors import ConfigurationError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.fsdp import FullyShardedDataParallel

_ENV = launch_variables("FullyShardedDataParallelPlugin")  # field -> the variable `hasten launch` writes
_MIXED_PRECISION = {
    "fp8": torch.bfloat16,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


def _torch_enum(kind: type[enum.Enum], value: Any, name: str) -> Any:
    """A member of the torch enum ``kind``: itself, its name (any case; for sharding strategies also the
    names of ``FSDP_SHARDING_STRATEGY``, which the launcher writes), or its number."""
    if isinstance(value, kind):
        return value
    is_strategy = kind.__name__ == "ShardingStrategy"
    names = FSDP_SHARDING_STRATEGY if is_strategy else list(kind.__members__)
    if is_strategy and isinstance(value, str) and value.strip().upper() in names:
        value = names.index(value.strip().upper()) + 1
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return kind(value)
        except ValueError:
            pass
    if isinstance(value, str) and value.strip().upper() in kind.__members__:
        return kind[value.strip().upper()]
    raise ConfigurationError(f"{name}={value!r} is not valid; expected one of {names}.")


def _version(value: Any, name: str) -> int:
    if str(value).strip() in ("1", "2"):
        return int(value)
    raise ConfigurationError(f"{name}={value!r} is not an FSDP version; expected 1 or 2.")


def _regex(value: Any, name: str) -> Any:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ConfigurationError(
                f"{name}={value!r} is not a valid regular expression ({error})."
            ) from None
    return value


@dataclass
class FullyShardedDataParallelPlugin:
    """How to shard a model with FSDP1 or FSDP2 (``fsdp_version``; ``FSDP_VERSION``, default 1).

    Args:
        fsdp_version: 1 (``FullyShardedDataParallel``) or 2 (``fully_shard``).
        sharding_strategy: FSDP1 strategy by name (``FULL_SHARD``, ``SHARD_GRAD_OP``, ``NO_SHARD``,
            ``HYBRID_SHARD``, ``HYBRID_SHARD_ZERO2``), number or ``ShardingStrategy``. With FSDP2,
            ``FULL_SHARD`` and ``SHARD_GRAD_OP`` map to ``reshard_after_forward`` True and False.
        reshard_after_forward: FSDP2: free gathered parameters after forward (bool; default True).
            FSDP1: another name for ``sharding_strategy``.
        backward_prefetch: FSDP1 ``BackwardPrefetch`` by name (``NO_PREFETCH``: none).
        mixed_precision_policy: ``"fp16"``, ``"bf16"``, ``"fp8"``, ``"fp32"``, a dict of dtypes, or the
            torch policy object of the chosen version.
        auto_wrap_policy: ``"transformer_based_wrap"`` (by ``transformer_cls_names_to_wrap``),
            ``"size_based_wrap"`` (by ``min_num_params``), ``"no_wrap"``, or a callable policy.
        cpu_offload: offload parameters to CPU (bool or the torch object).
        ignored_modules: modules (or a regex matching module names) FSDP leaves alone.
        state_dict_type: ``FULL_STATE_DICT``, ``SHARDED_STATE_DICT`` or (FSDP1) ``LOCAL_STATE_DICT``.
        activation_checkpointing: recompute the wrapped blocks' activations in backward.
        cpu_ram_efficient_loading: load pretrained weights on the first process only.
        transformer_cls_names_to_wrap: class names of the blocks to shard separately (list or comma string).
        min_num_params: parameter count from which a module is sharded separately (size-based wrap).

    ``limit_all_gathers``, ``use_orig_params``, ``param_init_fn``, ``sync_module_states`` and
    ``forward_prefetch`` are FSDP1 options passed to ``FullyShardedDataParallel`` as they are.
    """

    fsdp_version: int | None = env_field(_ENV["fsdp_version"], 1, _version)
    sharding_strategy: Any = None
    reshard_after_forward: Any = None
    backward_prefetch: Any = None
    mixed_precision_policy: Any = None
    auto_wrap_policy: Any = env_field(_ENV["auto_wrap_policy"], "NO_WRAP")
    cpu_offload: Any = env_field(_ENV["cpu_offload"], False)
    ignored_modules: Iterable[torch.nn.Module] | str | None = env_field("FSDP_IGNORED_MODULES", None, _regex)
    state_dict_type: Any = None
    state_dict_config: Any = None
    optim_state_dict_config: Any = None
    limit_all_gathers: bool = True
    use_orig_params: bool | None = None
    param_init_fn: Callable[[torch.nn.Module], None] | None = None
    sync_module_states: bool | None = None
    forward_prefetch: bool | None = None
    activation_checkpointing: bool | None = env_field(_ENV["activation_checkpointing"], False, to_bool)
    activation_checkpointing_offload: bool | None = env_field(
        _ENV["activation_checkpointing_offload"], False, to_bool
    )
    cpu_ram_efficient_loading: bool | None = env_field(_ENV["cpu_ram_efficient_loading"], False, to_bool)
    transformer_cls_names_to_wrap: list[str] | None = None
    min_num_params: int | None = None

    def __post_init__(self) -> None:
        passed = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        resolve_fields(self)
        if self.fsdp_version == 1:
            self._resolve_fsdp1(passed)
        else:
            self._resolve_fsdp2(passed)
        self.set_cpu_offload()
        self.validate_cpu_offload()
        self.set_state_dict_type()
        self._resolve_auto_wrap_policy()
        if self.activation_checkpointing_offload and not self.activation_checkpointing:
            raise ConfigurationError(
                "activation_checkpointing_offload=True needs activation_checkpointing=True; set both or "
                "neither."
            )
        if self.activation_checkpointing_offload and self.fsdp_version != 2:
            raise ConfigurationError("activation_checkpointing_offload=True needs fsdp_version=2.")
        if isinstance(self.mixed_precision_policy, str):
            self.set_mixed_precision(self.mixed_precision_policy, override=True)
        elif isinstance(self.mixed_precision_policy, dict):
            self.set_mixed_precision(self.mixed_precision_policy)
        if self.mixed_precision_policy is not None:
            self.validate_mixed_precision_policy()

    def _flag(self, name: str) -> bool:
        value = getattr(self, name)
        if value is not None:
            return to_bool(value, name)
        raw = read_env(_ENV[name])
        return False if raw is None else to_bool(raw, f"environment variable {_ENV[name]}")

    def _resolve_fsdp1(self, passed: set[str]) -> None:
        from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy

        if self.sharding_strategy is None and self.reshard_after_forward is not None:
            self.sharding_strategy = _torch_enum(
                ShardingStrategy, self.reshard_after_forward, "reshard_after_forward"
            )
        if self.sharding_strategy is None:
            self.sharding_strategy = read_env(_ENV["sharding_strategy"]) or "FULL_SHARD"
            where = f"environment variable {_ENV['sharding_strategy']}"
        else:
            where = "sharding_strategy"
        self.sharding_strategy = _torch_enum(ShardingStrategy, self.sharding_strategy, where)
        if self.reshard_after_forward is not None:
            strategy = _torch_enum(ShardingStrategy, self.reshard_after_forward, "reshard_after_forward")
            if strategy != self.sharding_strategy:
                raise ConfigurationError(
                    f"reshard_after_forward={self.reshard_after_forward!r} contradicts "
                    f"sharding_strategy={self.sharding_strategy.name!r}; with FSDP1 pass only one of them."
                )
            self.reshard_after_forward = strategy
        prefetch = (
            self.backward_prefetch
            if self.backward_prefetch is not None
            else read_env(_ENV["backward_prefetch"])
        )
        if isinstance(prefetch, str) and prefetch.strip().upper() == "NO_PREFETCH":
            prefetch = None
        where = (
            "backward_prefetch"
            if "backward_prefetch" in passed
            else f"environment variable {_ENV['backward_prefetch']}"
        )
        self.backward_prefetch = None if prefetch is None else _torch_enum(BackwardPrefetch, prefetch, where)
        self.use_orig_params = self._flag("use_orig_params")
        self.sync_module_states = self._flag("sync_module_states")
        self.forward_prefetch = self._flag("forward_prefetch")
        if self.cpu_ram_efficient_loading:
            self.sync_module_states = True  # the other ranks receive the weights from the first
        if self.sync_module_states and self.param_init_fn is None:
            device = torch.device(accelerator_type())

            def materialize(module: torch.nn.Module) -> None:
                module.to_empty(device=device, recurse=False)

            self.param_init_fn = materialize

    def _resolve_fsdp2(self, passed: set[str]) -> None:
        from torch.distributed.fsdp import ShardingStrategy

        if self.reshard_after_forward is None and self.sharding_strategy is not None:
            strategy = _torch_enum(ShardingStrategy, self.sharding_strategy, "sharding_strategy")
            equivalents = {ShardingStrategy.FULL_SHARD: True, ShardingStrategy.SHARD_GRAD_OP: False}
            if strategy not in equivalents:
                raise ConfigurationError(
                    f"sharding_strategy={self.sharding_strategy!r} has no FSDP2 equivalent; use "
                    f"{[s.name for s in equivalents]} or reshard_after_forward=True/False, or fsdp_version=1."
                )
            self.reshard_after_forward = equivalents[strategy]
        if self.reshard_after_forward is None:
            raw = read_env(_ENV["reshard_after_forward"])
            self.reshard_after_forward = (
                True if raw is None else to_bool(raw, f"environment variable {_ENV['reshard_after_forward']}")
            )
        elif not isinstance(self.reshard_after_forward, bool):
            self.reshard_after_forward = to_bool(self.reshard_after_forward, "reshard_after_forward")
        prefetch = (
            self.backward_prefetch
            if self.backward_prefetch is not None
            else read_env(_ENV["backward_prefetch"])
        )
        if prefetch is not None and not (
            isinstance(prefetch, str) and prefetch.strip().upper() == "NO_PREFETCH"
        ):
            raise ConfigurationError(
                f"backward_prefetch={prefetch!r} is an FSDP1 option; FSDP2 prefetches by itself. Drop it or "
                "use fsdp_version=1."
            )
        self.backward_prefetch = None
        for name in ("forward_prefetch", "sync_module_states"):
            if name in passed:
                raise ConfigurationError(
                    f"{name}={getattr(self, name)!r} is an FSDP1 option; drop it with fsdp_version=2."
                )
        if self.use_orig_params is False:
            raise ConfigurationError(
                "use_orig_params=False is impossible with FSDP2, which always uses the original parameters."
            )
        self.use_orig_params = None

    def _resolve_auto_wrap_policy(self) -> None:
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

        if not isinstance(self.auto_wrap_policy, str):
            return
        where = (
            f"environment variable {_ENV['auto_wrap_policy']}"
            if is_set_in_env(self, "auto_wrap_policy")
            else "auto_wrap_policy"
        )
        choice = one_of(FSDP_AUTO_WRAP_POLICY)(self.auto_wrap_policy, where)
        if choice == "TRANSFORMER_BASED_WRAP":
            self.auto_wrap_policy = transformer_auto_wrap_policy
            names = self.transformer_cls_names_to_wrap
            if names is None and read_env(_ENV["transformer_cls_names_to_wrap"]) is not None:
                names = comma_list(
                    read_env(_ENV["transformer_cls_names_to_wrap"]),
                    f"environment variable {_ENV['transformer_cls_names_to_wrap']}",
                )
            self.transformer_cls_names_to_wrap = (
                None if names is None else comma_list(names, "transformer_cls_names_to_wrap")
            )
        elif choice == "SIZE_BASED_WRAP":
            self.auto_wrap_policy = size_based_auto_wrap_policy
            if self.min_num_params is None:
                raw = read_env(_ENV["min_num_params"])
                self.min_num_params = (
                    0
                    if raw is None
                    else non_negative_int(raw, f"environment variable {_ENV['min_num_params']}")
                )
            else:
                self.min_num_params = non_negative_int(self.min_num_params, "min_num_params")
        else:
            self.auto_wrap_policy = None

    def set_state_dict_type(self, state_dict_type: Any = None) -> None:
        """Set the state-dict type (argument, else ``FSDP_STATE_DICT_TYPE``) and matching configs."""
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            ShardedOptimStateDictConfig,
            ShardedStateDictConfig,
            StateDictType,
        )

        if state_dict_type is not None:
            self.state_dict_type = state_dict_type
        where = "state_dict_type"
        if self.state_dict_type is None:
            default = "FULL_STATE_DICT" if self.fsdp_version == 1 else "SHARDED_STATE_DICT"
            self.state_dict_type = read_env(_ENV["state_dict_type"]) or default
            where = f"environment variable {_ENV['state_dict_type']}"
        self.state_dict_type = _torch_enum(StateDictType, self.state_dict_type, where)
        if self.fsdp_version == 2 and self.state_dict_type.name not in FSDP2_STATE_DICT_TYPE:
            raise ConfigurationError(
                f"state_dict_type={self.state_dict_type.name} does not exist in FSDP2; use one of "
                f"{FSDP2_STATE_DICT_TYPE}."
            )
        if self.state_dict_type == StateDictType.FULL_STATE_DICT:
            if self.state_dict_config is None:
                self.state_dict_config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
            if self.optim_state_dict_config is None:
                self.optim_state_dict_config = FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)
        elif self.state_dict_type == StateDictType.SHARDED_STATE_DICT:
            if self.state_dict_config is None:
                self.state_dict_config = ShardedStateDictConfig(offload_to_cpu=True)
            if self.optim_state_dict_config is None:
                self.optim_state_dict_config = ShardedOptimStateDictConfig(offload_to_cpu=True)

    def set_mixed_precision(
        self, mixed_precision: Any, buffer_autocast: bool = False, override: bool = False
    ) -> None:
        """Build the version's mixed-precision policy from a precision name, a dtype, or a dict of dtypes."""
        from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

        if isinstance(mixed_precision, dict):
            dtype: Any = None
        elif isinstance(mixed_precision, str):
            dtype = _MIXED_PRECISION.get(mixed_precision)
            if dtype is None:
                raise ConfigurationError(
                    f"mixed_precision_policy={mixed_precision!r} is not valid; expected one of "
                    f"{list(_MIXED_PRECISION)}."
                )
        elif isinstance(mixed_precision, torch.dtype) and mixed_precision in _MIXED_PRECISION.values():
            dtype = mixed_precision
        else:
            raise ConfigurationError(
                f"mixed_precision={mixed_precision!r} is not valid; expected one of "
                f"{list(_MIXED_PRECISION)}, "
                "a torch dtype among them, or a dict of dtypes."
            )
        keys = ["param_dtype", "reduce_dtype", "buffer_dtype" if self.fsdp_version == 1 else "output_dtype"]
        if isinstance(mixed_precision, dict):
            policy = mixed_precision
            missing = [key for key in keys if key not in policy]
            extra = sorted(set(policy) - set(keys))
            bad = [key for key, value in policy.items() if value not in _MIXED_PRECISION.values()]
            if missing or extra or bad:
                raise ConfigurationError(
                    f"mixed_precision_policy={policy!r} is not valid for FSDP{self.fsdp_version}: it needs "
                    "exactly the "
                    f"keys {keys} with values among {sorted(set(_MIXED_PRECISION.values()), key=str)}."
                )
            built = dict(policy)
        elif override or self.mixed_precision_policy is None:
            built = {"param_dtype": dtype, "reduce_dtype": dtype}
            built[keys[2]] = torch.float32 if buffer_autocast and self.fsdp_version == 1 else dtype
        else:
            return
        self.mixed_precision_policy = (
            MixedPrecision(**built) if self.fsdp_version == 1 else MixedPrecisionPolicy(**built)
        )

    def validate_mixed_precision_policy(self) -> None:
        """Check that the policy is the torch type the chosen FSDP version takes."""
        from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

        required = MixedPrecision if self.fsdp_version == 1 else MixedPrecisionPolicy
        if not isinstance(self.mixed_precision_policy, required):
            raise ConfigurationError(
                f"mixed_precision_policy={self.mixed_precision_policy!r} must be a torch.distributed.fsdp."
                f"{required.__name__} with fsdp_version={self.fsdp_version} (or a precision name or dict)."
            )

    def set_cpu_offload(self) -> None:
        """Turn a boolean ``cpu_offload`` into the version's offload object."""
        from torch.distributed.fsdp import CPUOffload, CPUOffloadPolicy, OffloadPolicy

        if isinstance(self.cpu_offload, str):
            where = (
                f"environment variable {_ENV['cpu_offload']}"
                if is_set_in_env(self, "cpu_offload")
                else "cpu_offload"
            )
            self.cpu_offload = to_bool(self.cpu_offload, where)
        if isinstance(self.cpu_offload, bool):
            if self.fsdp_version == 1:
                self.cpu_offload = CPUOffload(offload_params=self.cpu_offload)
            else:
                self.cpu_offload = CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()

    def validate_cpu_offload(self) -> None:
        """Check that ``cpu_offload`` is the torch type the chosen FSDP version takes."""
        from torch.distributed.fsdp import CPUOffload, OffloadPolicy

        required = CPUOffload if self.fsdp_version == 1 else OffloadPolicy
        if not isinstance(self.cpu_offload, required):
            raise ConfigurationError(
                f"cpu_offload={self.cpu_offload!r} must be a bool or a "
                f"torch.distributed.fsdp.{required.__name__} "
                f"with fsdp_version={self.fsdp_version}."
            )

    def state_dict_options(self) -> StateDictOptions:
        """``torch.distributed.checkpoint`` options for ``state_dict_type``: full (gathered, on CPU) or
        sharded."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        from torch.distributed.fsdp import StateDictType

        full = self.state_dict_type == StateDictType.FULL_STATE_DICT
        offload = bool(getattr(self.state_dict_config, "offload_to_cpu", True))
        return StateDictOptions(full_state_dict=full, cpu_offload=offload)

    def set_auto_wrap_policy(self, model: torch.nn.Module) -> None:
        """Bind the wrap policy to ``model``: transformer classes found by name, or the size threshold."""
        from hasten.utils.dataclasses.plugins.fsdp_wrap import bind_auto_wrap_policy

        self.auto_wrap_policy = bind_auto_wrap_policy(self, model)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module | FullyShardedDataParallel:
        """Shard ``model`` as configured, on the current process group (see :mod:`.fsdp_wrap`)."""
        from hasten.utils.dataclasses.plugins.fsdp_wrap import wrap_model

        return wrap_model(self, model)
