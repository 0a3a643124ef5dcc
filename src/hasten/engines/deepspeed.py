"""The DeepSpeed engine: ``deepspeed.initialize`` with the plugin's config (ZeRO 0-3, offload, its own
mixed precision), and DeepSpeed's engine running backward, clipping and the optimizer step.

``prepare`` hands the model, its optimizer (or ``DummyOptim``) and scheduler (or ``DummyScheduler``)
to ``deepspeed.initialize`` together, after filling the config's ``"auto"`` values from the set-up
(:mod:`hasten.engines.deepspeed_setup`), and registers what it returns with the ``Accelerator``.
``Accelerator.backward`` is then the engine's backward, plus its step on the last batch of an
accumulation; the prepared optimizer's and scheduler's own ``step`` do nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from hasten.engines.base import CheckpointParts, Engine, Preparer, kind_of, refuse_unknown
from hasten.engines.deepspeed_setup import SetUp, fill_config, loader_batch_size
from hasten.optimizer import AcceleratedOptimizer
from hasten.scheduler import AcceleratedScheduler
from hasten.state import AcceleratorState, GradientState
from hasten.utils.deepspeed import (
    DeepSpeedEngineWrapper,
    DeepSpeedOptimizerWrapper,
    DeepSpeedSchedulerWrapper,
    DummyOptim,
    DummyScheduler,
    map_pytorch_optim_to_deepspeed,
)
from hasten.utils.errors import CheckpointError, ConfigurationError
from hasten.utils.imports import require

if TYPE_CHECKING:
    from hasten.engines.connector import Settings
    from hasten.engines.precision import Precision

logger = logging.getLogger(__name__)

_NULL = contextlib.nullcontext()


def _kind(obj: Any, deepspeed_schedulers: Sequence[str]) -> str | None:
    """:func:`~hasten.engines.base.kind_of`, knowing DeepSpeed's placeholders and schedulers too."""
    if isinstance(obj, DummyOptim):
        return "optimizer"
    if isinstance(obj, DummyScheduler) or type(obj).__name__ in deepspeed_schedulers:
        return "scheduler"
    return kind_of(obj)


def _offloads_optimizer(config: dict[str, Any]) -> bool:
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none") and bool(config.get("zero_force_ds_cpu_optimizer", True))


class DeepSpeedEngine(Engine):
    """Training driven by DeepSpeed's engine (ZeRO stages 0 to 3)."""

    name = "DeepSpeed"
    casts_itself = True

    def __init__(self, settings: Settings, precision: Precision) -> None:
        super().__init__(settings, precision)
        self.state = AcceleratorState()
        self.gradient_state = GradientState()
        self.wrapped: DeepSpeedEngineWrapper | None = None
        self._wrapped_trains = False
        self.engines: list[Any] = []
        self._batch_sizes: list[int] = []

    # --- preparation ------------------------------------------------------------------------

    def prepare(
        self, preparer: Preparer, objects: Sequence[Any], placements: Sequence[bool | None]
    ) -> list[Any]:
        """Prepare the data loaders, then hand model, optimizer and scheduler to ``deepspeed.initialize``.

        Raises:
            ConfigurationError: a per-object ``device_placement`` (DeepSpeed places everything itself),
                several models (one ``prepare`` call initialises one DeepSpeed engine), or an optimizer
                or scheduler without its model.
        """
        import deepspeed

        if any(placement is not None for placement in placements):
            raise ConfigurationError(
                f"device_placement={list(placements)!r}: the DeepSpeed engine places the model, optimizer "
                "and batches itself, so placement cannot be chosen per object. Call prepare() without "
                "device_placement."
            )

        schedulers = deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES
        kinds = [_kind(obj, schedulers) for obj in objects]
        refuse_unknown([obj for obj, kind in zip(objects, kinds) if kind is None])
        result = list(objects)
        for index, kind in enumerate(kinds):
            if kind == "data_loader":
                size = loader_batch_size(objects[index])
                if size is not None:
                    self._batch_sizes.append(size)
                result[index] = preparer.prepare_data_loader(objects[index])
        found = {
            kind: [i for i, k in enumerate(kinds) if k == kind]
            for kind in ("model", "optimizer", "scheduler")
        }
        if len(found["model"]) > 1:
            raise ConfigurationError(
                f"prepare() got {len(found['model'])} models; under DeepSpeed each call initialises one "
                "engine. "
                "Prepare each model (with its optimizer and scheduler) in its own call."
            )
        if not found["model"]:
            if found["optimizer"] or found["scheduler"]:
                raise ConfigurationError(
                    "Under DeepSpeed an optimizer or scheduler is prepared together with its model "
                    "(deepspeed.initialize takes them at once): "
                    "`model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)`."
                )
            return result
        optimizer = objects[found["optimizer"][0]] if found["optimizer"] else None
        scheduler = objects[found["scheduler"][0]] if found["scheduler"] else None
        engine, ds_optimizer, ds_scheduler = self._initialize(
            preparer, objects[found["model"][0]], optimizer, scheduler
        )
        for kind, replacement, register in (
            ("model", engine, preparer.prepare_model),
            ("optimizer", ds_optimizer, preparer.prepare_optimizer),
            ("scheduler", ds_scheduler, preparer.prepare_scheduler),
        ):
            for index in found[kind]:
                replacement._is_accelerate_prepared = True
                result[index] = register(replacement)
        return result

    def wrap_model(self, model: nn.Module, device_placement: bool, evaluation_mode: bool) -> nn.Module:
        """``deepspeed.initialize`` with the model alone (an engine for inference or for a frozen model); in
        ``evaluation_mode`` only place it."""
        if evaluation_mode:
            return model.to(self.settings.device) if device_placement else model
        engine, _, _ = self._initialize(None, model, None, None)
        return engine

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, device_placement: bool
    ) -> AcceleratedOptimizer:
        """Refused: under DeepSpeed an optimizer is prepared with its model.

        Raises:
            ConfigurationError: always (the optimizer would not be DeepSpeed's, and would step nothing
                the engine trains).
        """
        raise ConfigurationError(
            f"prepare_optimizer({type(optimizer).__qualname__}) under DeepSpeed: deepspeed.initialize takes "
            "the optimizer together with its model. Pass both to one call: "
            "`model, optimizer = accelerator.prepare(model, optimizer)`."
        )

    def _initialize(
        self, preparer: Preparer | None, model: nn.Module, optimizer: Any, scheduler: Any
    ) -> tuple[Any, Any, Any]:
        """Fill the config, run ``deepspeed.initialize``, wrap what it returns."""
        require("deepspeed", purpose="The DeepSpeed engine")
        import deepspeed

        plugin = self.state.deepspeed_plugin
        settings = self.settings
        split_batches = False if preparer is None else preparer.split_batches
        setup = SetUp(
            tuple(self._batch_sizes), self.gradient_state.num_steps, settings.num_processes, split_batches
        )
        config = fill_config(plugin, model, optimizer, scheduler, setup)
        self.gradient_state.plugin_kwargs["num_steps"] = config["gradient_accumulation_steps"]
        plugin.set_moe_leaf_modules(model)
        kwargs: dict[str, Any] = {"model": model, "config": config}
        if isinstance(optimizer, DummyOptim):
            kwargs["model_parameters"] = optimizer.params
            if isinstance(scheduler, DummyScheduler) and scheduler.lr_scheduler_callable is not None:
                kwargs["lr_scheduler"] = scheduler.lr_scheduler_callable
        elif optimizer is not None:
            kwargs["optimizer"] = (
                map_pytorch_optim_to_deepspeed(optimizer) if _offloads_optimizer(config) else optimizer
            )
            if type(scheduler).__name__ in deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES:
                kwargs["lr_scheduler"] = scheduler
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(**kwargs)
        if settings.compiles:
            compile_kwargs = settings.dynamo_plugin.to_kwargs()
            engine.compile(backend=compile_kwargs.pop("backend"), compile_kwargs=compile_kwargs)
        self.engines.append(engine)
        if self.wrapped is None or (optimizer is not None and not self._wrapped_trains):
            self.wrapped = DeepSpeedEngineWrapper(engine)  # the first engine that trains drives backward
            self._wrapped_trains = optimizer is not None
        elif optimizer is not None:
            logger.warning(
                "A second DeepSpeed engine with an optimizer was prepared; Accelerator.backward drives the "
                "first one only. Use one Accelerator per trained model."
            )
        wrapped_optimizer = None if optimizer is None else DeepSpeedOptimizerWrapper(ds_optimizer)
        wrapped_scheduler: AcceleratedScheduler | None = None
        if scheduler is not None and ds_scheduler is not None:
            wrapped_scheduler = DeepSpeedSchedulerWrapper(ds_scheduler, wrapped_optimizer)
        elif scheduler is not None:
            wrapped_scheduler = self.wrap_scheduler(
                scheduler,
                [wrapped_optimizer],
                True if preparer is None else preparer.step_scheduler_with_optimizer,
                split_batches,
            )
        return engine, wrapped_optimizer, wrapped_scheduler

    # --- per step ---------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, accumulation_steps: int, **kwargs: Any) -> None:
        """The DeepSpeed engine's backward (it divides by the accumulation steps and scales), and its step
        when this batch ends an accumulation.

        Raises:
            ConfigurationError: no model was prepared yet.
        """
        wrapped = self.wrapped
        if wrapped is None:
            raise ConfigurationError(
                "backward() under DeepSpeed runs through the engine prepare() builds; prepare the model and "
                "its optimizer first."
            )
        wrapped.backward(loss, sync_gradients=self.gradient_state.sync_gradients, **kwargs)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Below ZeRO-2, the engine's ``no_sync``; from ZeRO-2 on, nothing (gradients are partitioned as they
        are produced, and DeepSpeed accumulates them itself)."""
        plugin = self.state.deepspeed_plugin
        if self.settings.use_distributed and plugin.zero_stage < 2 and hasattr(model, "no_sync"):
            return cast(Any, model).no_sync()
        return _NULL

    def clip_grad_norm_(
        self, parameters: Any, max_norm: float, norm_type: float, optimizers: Sequence[Any]
    ) -> Any:
        """The total gradient norm of the engine's last step: DeepSpeed clips inside its step, to the
        config's ``gradient_clipping``, not to ``max_norm``."""
        return None if self.wrapped is None else self.wrapped.get_global_grad_norm()

    def clip_grad_value_(self, parameters: Any, clip_value: float, optimizers: Sequence[Any]) -> None:
        """Refused: DeepSpeed clips by norm only.

        Raises:
            ConfigurationError: always.
        """
        raise ConfigurationError(
            f"clip_grad_value_(clip_value={clip_value!r}) cannot run under DeepSpeed, which clips gradients "
            "by "
            "their norm inside its step; set gradient_clipping in the DeepSpeed config (DeepSpeedPlugin("
            "gradient_clipping=...)) and call clip_grad_norm_ to read the norm."
        )

    # --- whole model ------------------------------------------------------------------------

    def _engine_of(self, model: nn.Module) -> Any:
        if hasattr(model, "zero_gather_16bit_weights_on_model_save"):
            return model
        return next((engine for engine in self.engines if engine.module is model), None)

    def state_dict(self, model: nn.Module, unwrap: bool) -> dict[str, Any] | None:
        """The full state dict: under ZeRO-3 gathered onto the main process (``None`` elsewhere), otherwise
        each process's copy.

        Raises:
            ConfigurationError: ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``.
        """
        engine = self._engine_of(model)
        if engine is not None and engine.zero_optimization_partition_weights():
            if not engine.zero_gather_16bit_weights_on_model_save():
                raise ConfigurationError(
                    "Under ZeRO-3 the full state dict is gathered only when the DeepSpeed config sets "
                    "zero_optimization.stage3_gather_16bit_weights_on_model_save to true "
                    "(DeepSpeedPlugin(zero3_save_16bit_model=True)). Set it, or save a sharded checkpoint "
                    "with engine.save_checkpoint(folder) and merge it with DeepSpeed's zero_to_fp32.py."
                )
            return engine._zero3_consolidated_16bit_state_dict()
        from deepspeed.checkpoint.utils import clone_tensors_for_torch_save

        bare = self.unwrap(model, keep_fp32_wrapper=True, keep_torch_compile=False) if unwrap else model
        return clone_tensors_for_torch_save(bare.state_dict())

    def checkpoint_parts(
        self, models: Sequence[nn.Module], optimizers: Sequence[Any], schedulers: Sequence[Any]
    ) -> CheckpointParts:
        """DeepSpeed's own checkpoint holds the models, optimizers and the schedulers it steps."""
        return CheckpointParts(
            [], [], [s for s in schedulers if not isinstance(s, DeepSpeedSchedulerWrapper)]
        )

    def _checkpointed(self, models: Sequence[nn.Module]) -> list[tuple[str, Any]]:
        found = []
        for index, model in enumerate(models):
            engine = self._engine_of(model)
            if engine is None:
                raise ConfigurationError(
                    f"Model {index} ({type(model).__qualname__}) was not prepared by DeepSpeed, so its state "
                    "cannot go into DeepSpeed's checkpoint; prepare every trained model with the Accelerator."
                )
            found.append(("pytorch_model" if index == 0 else f"pytorch_model_{index}", engine))
        return found

    def save_checkpoint(
        self, folder: Path, models: Sequence[nn.Module], optimizers: Sequence[Any], kwargs: dict[str, Any]
    ) -> None:
        """Each engine's ``save_checkpoint(folder, "pytorch_model[_i]", **kwargs)`` (Accelerate's tags)."""
        for tag, engine in self._checkpointed(models):
            engine.save_checkpoint(str(folder), tag, **kwargs)

    def load_checkpoint(
        self, folder: Path, models: Sequence[nn.Module], optimizers: Sequence[Any], kwargs: dict[str, Any]
    ) -> None:
        """Each engine's ``load_checkpoint(folder, "pytorch_model[_i]", **kwargs)``.

        Raises:
            CheckpointError: the checkpoint has no DeepSpeed folder under that tag.
        """
        for tag, engine in self._checkpointed(models):
            if not (folder / tag).is_dir():
                raise CheckpointError(
                    f"{folder / tag} is missing: DeepSpeed has no checkpoint to load there (was the state "
                    "saved by save_state under DeepSpeed?). Nothing was loaded."
                )
            engine.load_checkpoint(str(folder), tag, **kwargs)

    def release(self) -> None:
        """Destroy the DeepSpeed engines (their hooks and buffers) and forget them."""
        for engine in self.engines:
            engine.destroy()
        self.engines = []
        self.wrapped = None
        self._wrapped_trains = False
        self._batch_sizes = []
