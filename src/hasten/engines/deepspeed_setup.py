"""Filling a DeepSpeed config from the training set-up, before ``deepspeed.initialize``.

The plugin's config may leave values to the set-up (``"auto"``): the micro batch size comes from the
data loaders, the accumulation steps from the ``Accelerator``, bucket sizes from the model's hidden
size, the learning rate and warm-up from ``DummyOptim`` / ``DummyScheduler``. An ``"auto"`` the
set-up cannot fill is an error naming the key, not a failure inside DeepSpeed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from hasten.utils.deepspeed import DummyOptim, DummyScheduler
from hasten.utils.errors import ConfigurationError

logger = logging.getLogger(__name__)

_HIDDEN_SIZE_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


@dataclass(frozen=True)
class SetUp:
    """What the config is filled from."""

    batch_sizes: tuple[int, ...]
    accumulation_steps: int
    num_processes: int
    split_batches: bool


def loader_batch_size(loader: Any) -> int | None:
    """The batch size a data loader yields (read from its batch sampler when it has none itself)."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) else None


def micro_batch_size(plugin: Any, setup: SetUp) -> int | None:
    """The per-process batch size: the config's, or (when ``"auto"``) the data loaders' (the smallest with
    ``is_train_batch_min``, else the largest; split over the processes with ``split_batches``).

    Raises:
        ConfigurationError: the config says ``"auto"`` and no data loader with a batch size was prepared.
    """
    if not plugin.is_auto("train_micro_batch_size_per_gpu"):
        value = plugin.get_value("train_micro_batch_size_per_gpu")
        return value if isinstance(value, int) else None
    if not setup.batch_sizes:
        raise ConfigurationError(
            "The DeepSpeed config sets train_micro_batch_size_per_gpu to 'auto', but no data loader with a "
            "batch size was prepared before the model. Pass the training data loader to the same prepare() "
            "call (or an earlier one), or set train_micro_batch_size_per_gpu in the config."
        )
    sizes = (
        [size // setup.num_processes for size in setup.batch_sizes]
        if setup.split_batches
        else setup.batch_sizes
    )
    return min(sizes) if plugin.is_train_batch_min else max(sizes)


def resolve_accumulation(plugin: Any, accumulation_steps: int) -> int:
    """The accumulation steps DeepSpeed runs with: the ``Accelerator``'s, unless the config sets its own
    (which then wins, as in Accelerate)."""
    plugin.fill_match(
        "gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=accumulation_steps
    )
    steps = plugin.get_value("gradient_accumulation_steps")
    if steps != accumulation_steps:
        logger.warning(
            "The DeepSpeed config accumulates gradients over %s steps and the Accelerator over %s; "
            "DeepSpeed's "
            "value is used.",
            steps,
            accumulation_steps,
        )
    return int(steps)


def check_optimizer_and_scheduler(config: dict[str, Any], optimizer: Any, scheduler: Any) -> None:
    """Refuse an optimizer or scheduler given both in the code and in the config, or a placeholder for one
    the config lacks.

    Raises:
        ConfigurationError: each case, with the fix.
    """
    dummy_optim, dummy_scheduler = isinstance(optimizer, DummyOptim), isinstance(scheduler, DummyScheduler)
    if optimizer is not None and ("optimizer" in config) != dummy_optim:
        raise ConfigurationError(
            "The DeepSpeed config has an 'optimizer' section and the code passes a torch optimizer; keep "
            "one: "
            "remove the section, or pass DummyOptim(model.parameters()) to prepare()."
            if not dummy_optim
            else "DummyOptim stands for the 'optimizer' section of the DeepSpeed config, which has none; add "
            "one, or pass a torch optimizer."
        )
    if scheduler is not None:
        if "scheduler" in config and not dummy_scheduler:
            raise ConfigurationError(
                "The DeepSpeed config has a 'scheduler' section and the code passes a scheduler; keep one: "
                "remove the section, or pass DummyScheduler(optimizer) to prepare()."
            )
        if dummy_scheduler and "scheduler" not in config and scheduler.lr_scheduler_callable is None:
            raise ConfigurationError(
                "DummyScheduler stands for the 'scheduler' section of the DeepSpeed config, which has none; "
                "add one, or pass DummyScheduler(optimizer, lr_scheduler_callable=...)."
            )
        if dummy_optim and not dummy_scheduler:
            raise ConfigurationError(
                f"With DummyOptim (the config's optimizer) the scheduler must be a DummyScheduler too, got a "
                f"{type(scheduler).__qualname__}: the config's optimizer only exists inside DeepSpeed."
            )


def _hidden_size(model: Any, keys: list[str]) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None and getattr(config, "hidden_sizes", None):
        size = max(config.hidden_sizes)  # type: ignore[union-attr]
    if not isinstance(size, int):
        raise ConfigurationError(
            f"The DeepSpeed config sets {keys} to 'auto', which are derived from model.config.hidden_size, "
            f"but this {type(model).__qualname__} has no such value. Set integers for them in the config."
        )
    return size


def fill_config(plugin: Any, model: Any, optimizer: Any, scheduler: Any, setup: SetUp) -> dict[str, Any]:
    """Fill every ``"auto"`` value of the plugin's config from the set-up; returns the config.

    Raises:
        ConfigurationError: an ``"auto"`` value cannot be derived (the key is named), or the
            optimizer / scheduler clash with the config.
    """
    config = plugin.deepspeed_config
    values: dict[str, Any] = {
        "gradient_clipping": 1.0,
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
    }
    micro = micro_batch_size(plugin, setup)
    steps = resolve_accumulation(plugin, setup.accumulation_steps)
    if micro is not None:
        values["train_micro_batch_size_per_gpu"] = micro
        values["train_batch_size"] = micro * steps * setup.num_processes
    check_optimizer_and_scheduler(config, optimizer, scheduler)
    if isinstance(optimizer, torch.optim.Optimizer):
        config["zero_allow_untested_optimizer"] = True
    hidden_keys = [key for key in _HIDDEN_SIZE_KEYS if plugin.is_auto(key)]
    if hidden_keys:
        size = _hidden_size(model, hidden_keys)
        values.update(
            {
                _HIDDEN_SIZE_KEYS[0]: size * size,
                _HIDDEN_SIZE_KEYS[1]: int(0.9 * size * size),
                _HIDDEN_SIZE_KEYS[2]: 10 * size,
            }
        )
    if isinstance(optimizer, DummyOptim):
        values["optimizer.params.lr"] = optimizer.lr
        values["optimizer.params.weight_decay"] = optimizer.weight_decay
    if isinstance(scheduler, DummyScheduler) and scheduler.lr_scheduler_callable is None:
        defaults = getattr(scheduler.optimizer, "defaults", None)
        values["scheduler.params.warmup_min_lr"] = 0
        values["scheduler.params.warmup_max_lr"] = (
            getattr(scheduler.optimizer, "lr", None) if defaults is None else defaults["lr"]
        )
        values["scheduler.params.warmup_num_steps"] = max(1, scheduler.warmup_num_steps)
        if scheduler.total_num_steps is not None:
            total = scheduler.total_num_steps
            values["scheduler.params.total_num_steps"] = (
                total if setup.split_batches else math.ceil(total / setup.num_processes)
            )
    plugin.deepspeed_config_process(must_match=False, **values)
    return config
