"""The FSDP and DeepSpeed plugins an ``Accelerator`` runs with, resolved once at construction.

A plugin comes from the argument, else from the launcher's ``ACCELERATE_USE_FSDP`` /
``ACCELERATE_USE_DEEPSPEED`` (built from the ``FSDP_*`` / ``ACCELERATE_DEEPSPEED_*`` variables),
else from the live state when a second ``Accelerator`` is built. What cannot run is refused here,
before any process group is formed: FSDP1 (hasten runs FSDP2), DeepSpeed without deepspeed
installed, two engines at once, and a second ``Accelerator`` asking for other plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hasten.state import AcceleratorState
from hasten.utils.dataclasses.enums import PrecisionType
from hasten.utils.dataclasses.plugins.deepspeed import DeepSpeedPlugin
from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin
from hasten.utils.environment import parse_flag_from_env
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import require


@dataclass(frozen=True)
class EnginePlugins:
    """The plugins of the engine chosen: at most one of the two is set."""

    deepspeed: dict[str, DeepSpeedPlugin] | None = None
    fsdp: FullyShardedDataParallelPlugin | None = None


def _deepspeed_plugins(deepspeed_plugin: Any, deepspeed_plugins: Any) -> dict[str, DeepSpeedPlugin] | None:
    if deepspeed_plugin is not None and deepspeed_plugins is not None:
        raise ConfigurationError(
            "deepspeed_plugin and deepspeed_plugins were both passed; pass one (deepspeed_plugins takes a "
            "dict of named plugins)."
        )
    given = deepspeed_plugins if deepspeed_plugins is not None else deepspeed_plugin
    if given is None:
        return None
    plugins = given if isinstance(given, dict) else {"default": given}
    if not plugins:
        raise ConfigurationError("deepspeed_plugins={} holds no plugin; pass {name: DeepSpeedPlugin(...)}.")
    for key, plugin in plugins.items():
        if not isinstance(plugin, DeepSpeedPlugin):
            where = f"deepspeed_plugins[{key!r}]" if isinstance(given, dict) else "deepspeed_plugin"
            raise TypeError(f"{where} must be a DeepSpeedPlugin, got {type(plugin).__qualname__}.")
    return dict(plugins)


def _check_fsdp(plugin: Any) -> FullyShardedDataParallelPlugin:
    if not isinstance(plugin, FullyShardedDataParallelPlugin):
        raise TypeError(
            f"fsdp_plugin must be a FullyShardedDataParallelPlugin, got {type(plugin).__qualname__}."
        )
    if plugin.fsdp_version != 2:
        raise ConfigurationError(
            f"The FSDP plugin asks for fsdp_version={plugin.fsdp_version!r} (FullyShardedDataParallel); "
            "hasten "
            "runs FSDP2 (fully_shard) only. Pass FullyShardedDataParallelPlugin(fsdp_version=2), set "
            "FSDP_VERSION=2, or convert a launch config with `hasten to-fsdp2`."
        )
    return plugin


def _from_live_state(live: AcceleratorState, given: EnginePlugins) -> EnginePlugins:
    """A second ``Accelerator`` runs the first one's engine: it may repeat its plugins, not change them."""
    running = EnginePlugins(live.deepspeed_plugins, live.fsdp_plugin)
    for name, wanted, have in (
        ("deepspeed_plugin", given.deepspeed, running.deepspeed),
        ("fsdp_plugin", given.fsdp, running.fsdp),
    ):
        if wanted is not None and wanted != have:
            raise ConfigurationError(
                f"This process's AcceleratorState runs {live.distributed_type.value} with "
                f"{name}={have!r}; a second Accelerator asked for {wanted!r}. An Accelerator shares the "
                "state of the first one: give every plugin to the first Accelerator, and none (or the same) "
                "to later ones."
            )
    return running


def resolve_plugins(deepspeed_plugin: Any, deepspeed_plugins: Any, fsdp_plugin: Any) -> EnginePlugins:
    """The engine plugins from the arguments, the launcher's variables, or the live state.

    Raises:
        TypeError: a plugin of the wrong type.
        ConfigurationError: both DeepSpeed arguments, both engines, FSDP1, or a second ``Accelerator``
            asking for plugins the live state does not run.
        ImportError: DeepSpeed was asked for and is not installed.
    """
    deepspeed = _deepspeed_plugins(deepspeed_plugin, deepspeed_plugins)
    fsdp = None if fsdp_plugin is None else _check_fsdp(fsdp_plugin)
    live = AcceleratorState._accelerator is not None
    if live:
        return _from_live_state(AcceleratorState(), EnginePlugins(deepspeed, fsdp))
    if deepspeed is None and fsdp is None:
        if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
            deepspeed = {"default": DeepSpeedPlugin()}
        elif parse_flag_from_env("ACCELERATE_USE_FSDP"):
            fsdp = _check_fsdp(FullyShardedDataParallelPlugin())
    if deepspeed is not None and fsdp is not None:
        raise ConfigurationError(
            "Both a DeepSpeed plugin and an FSDP plugin were given (as arguments or through "
            "ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP); one engine runs at a time. Pass one."
        )
    if deepspeed is not None:
        require("deepspeed", purpose="The DeepSpeed engine (deepspeed_plugin)")
    return EnginePlugins(deepspeed, fsdp)


def set_plugin_precision(plugins: EnginePlugins, mixed_precision: PrecisionType) -> PrecisionType:
    """Give the plugins the mixed precision and select the first DeepSpeed plugin; returns the precision
    the engine really trains in (under DeepSpeed, what its config enables)."""
    if plugins.fsdp is not None and mixed_precision != PrecisionType.NO:
        plugins.fsdp.set_mixed_precision(mixed_precision.value)
    if plugins.deepspeed is None:
        return mixed_precision
    for plugin in plugins.deepspeed.values():
        plugin.set_mixed_precision(mixed_precision.value)
    active = next((plugin for plugin in plugins.deepspeed.values() if plugin.selected), None)
    if active is None:
        active = next(iter(plugins.deepspeed.values()))
        active.select(_from_accelerator_state=True)
    config = active.deepspeed_config
    for mode in (PrecisionType.FP16, PrecisionType.BF16):
        if str(config.get(mode.value, {}).get("enabled", False)).lower() == "true":
            return mode
    return PrecisionType.NO
