"""The ``Accelerator``: one object that runs a PyTorch training loop on one process or many.

Switching from Accelerate is a change of import (``from hasten import Accelerator``): the
arguments, defaults, ``ACCELERATE_*`` variables, properties and methods are Accelerate 1.15's.

The constructor resolves everything once (:mod:`hasten.engines.connector`): the shared
state, one engine (single device, DDP, FSDP2 or DeepSpeed; the interface is in
:mod:`hasten.engines.base`) and one precision. The per-step methods (``backward``,
``accumulate``, the prepared optimizer's ``step``) then call the engine without branching on
which one it is, probing packages or reading the environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from hasten._checkpointing.methods import CheckpointingMixin
from hasten._tracking.methods import TrackingMixin
from hasten._tracking.registry import filter_trackers
from hasten.data_loader import prepare_data_loader, skip_first_batches
from hasten.engines.accumulation import Accumulate
from hasten.engines.connector import connect
from hasten.engines.ddp import trigger_sync_in_backward
from hasten.scheduler import AcceleratedScheduler
from hasten.utils.compilation import is_compiled_module
from hasten.utils.dataclasses.configs import DataLoaderConfiguration, ProjectConfiguration
from hasten.utils.dataclasses.kwargs import AutocastKwargs, ProfileKwargs
from hasten.utils.dataclasses.plugins.dynamo import TorchDynamoPlugin
from hasten.utils.errors import ConfigurationError
from hasten.utils.memory import release_memory
from hasten.utils.typing import PathLike

F = TypeVar("F", bound=Callable[..., Any])

_UNSET: Any = object()  # `split_batches`: accepted by Accelerate 1.x's signature, but no longer an argument


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False.")
    return value


class Accelerator(CheckpointingMixin, TrackingMixin):
    """Prepares models, optimizers, schedulers and data loaders for the process layout and precision
    given, then runs the training step's backward, accumulation, clipping and gathering.

    Every argument is Accelerate 1.15's, with the same default and ``ACCELERATE_*`` fallback:
    ``mixed_precision`` (``ACCELERATE_MIXED_PRECISION``), ``gradient_accumulation_steps``
    (``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` when left at 1), ``cpu`` (``ACCELERATE_USE_CPU``),
    ``dynamo_backend`` / ``dynamo_plugin`` (``ACCELERATE_DYNAMO_*``), the kwargs handlers, data
    loader and project configurations. Bad values raise when the ``Accelerator`` is built.

    Raises:
        ConfigurationError: a value is invalid, two arguments exclude each other, an engine hasten
            does not run (FSDP1, Megatron-LM, n-D parallelism) was asked for, FSDP2 or DeepSpeed
            without a process group, or a second ``Accelerator`` asks for what the shared state
            cannot change.
        ImportError: DeepSpeed was asked for and is not installed.
        TypeError: an argument has the wrong type.
    """

    def __init__(
        self,
        device_placement: bool = True,
        split_batches: bool = _UNSET,
        mixed_precision: Any = None,
        gradient_accumulation_steps: int = 1,
        cpu: bool = False,
        dataloader_config: DataLoaderConfiguration | None = None,
        deepspeed_plugin: Any = None,
        fsdp_plugin: Any = None,
        torch_tp_plugin: Any = None,
        megatron_lm_plugin: Any = None,
        rng_types: list[Any] | None = None,
        log_with: Any = None,
        project_dir: PathLike | None = None,
        project_config: ProjectConfiguration | None = None,
        gradient_accumulation_plugin: Any = None,
        step_scheduler_with_optimizer: bool = True,
        kwargs_handlers: list[Any] | None = None,
        dynamo_backend: Any = None,
        dynamo_plugin: TorchDynamoPlugin | None = None,
        deepspeed_plugins: Any = None,
        parallelism_config: Any = None,
    ) -> None:
        if split_batches is not _UNSET:
            raise ConfigurationError(
                f"split_batches={split_batches!r}: the Accelerator no longer takes it (Accelerate 1.x "
                "accepts and ignores it). Pass dataloader_config=DataLoaderConfiguration(split_batches=...)."
            )
        if project_config is None:
            project_config = ProjectConfiguration(
                project_dir=None if project_dir is None else str(project_dir)
            )
        elif not isinstance(project_config, ProjectConfiguration):
            raise TypeError(
                f"project_config must be a ProjectConfiguration, got {type(project_config).__qualname__}."
            )
        elif project_dir is not None and project_config.project_dir is None:
            project_config.set_directories(str(project_dir))
        if dataloader_config is None:
            dataloader_config = DataLoaderConfiguration()
        elif not isinstance(dataloader_config, DataLoaderConfiguration):
            raise TypeError(
                "dataloader_config must be a DataLoaderConfiguration, got "
                f"{type(dataloader_config).__qualname__}."
            )
        _bool(device_placement, "device_placement")  # checked before the state forms
        _bool(step_scheduler_with_optimizer, "step_scheduler_with_optimizer")
        trackers = filter_trackers(log_with, project_config.logging_dir)
        connection = connect(
            mixed_precision=mixed_precision,
            cpu=cpu,
            gradient_accumulation_steps=gradient_accumulation_steps,
            gradient_accumulation_plugin=gradient_accumulation_plugin,
            deepspeed_plugin=deepspeed_plugin,
            deepspeed_plugins=deepspeed_plugins,
            fsdp_plugin=fsdp_plugin,
            torch_tp_plugin=torch_tp_plugin,
            megatron_lm_plugin=megatron_lm_plugin,
            parallelism_config=parallelism_config,
            kwargs_handlers=kwargs_handlers,
            dynamo_backend=dynamo_backend,
            dynamo_plugin=dynamo_plugin,
            rng_types=rng_types,
        )
        self.state = connection.state
        self.gradient_state = connection.gradient_state
        self._settings = connection.settings
        self._engine = connection.engine
        self._precision = connection.precision
        handlers = self._settings.handlers
        self.ddp_handler = handlers.ddp
        self.scaler_handler = handlers.scaler
        self.init_handler = handlers.init
        self.fp8_recipe_handler = handlers.fp8_recipe
        self.autocast_handler = handlers.autocast
        self.profile_handler = handlers.profile
        self.has_fp8_handler = False
        self.fp8_enabled = False
        self.project_configuration = project_config
        self.dataloader_config = dataloader_config
        self.device_placement = device_placement
        self.step_scheduler_with_optimizer = step_scheduler_with_optimizer
        self.scaler = self._precision.scaler
        self.native_amp = self._precision.native_amp
        self.rng_types = list(self._settings.rng_types)
        self.log_with = trackers
        self.trackers: list[Any] = []
        self.flag_tensor: torch.Tensor | None = None
        # What save_state / load_state work from, named as Accelerate names them.
        self.step = 0
        self._models: list[nn.Module] = []
        self._optimizers: list[Any] = []
        self._schedulers: list[Any] = []
        self._dataloaders: list[Any] = []
        self._custom_objects: list[Any] = []

    # --- configurations -----------------------------------------------------------------------

    @property
    def split_batches(self) -> bool:
        """Whether each batch is split across processes (see ``DataLoaderConfiguration``)."""
        return self.dataloader_config.split_batches

    @property
    def dispatch_batches(self) -> bool | None:
        """Whether the main process iterates and sends each process its slice."""
        return self.dataloader_config.dispatch_batches

    @property
    def even_batches(self) -> bool:
        """Whether samples are repeated so every process gets as many batches (settable)."""
        return self.dataloader_config.even_batches

    @even_batches.setter
    def even_batches(self, value: bool) -> None:
        self.dataloader_config.even_batches = _bool(value, "even_batches")

    @property
    def use_seedable_sampler(self) -> bool:
        """Whether shuffling uses a sampler seeded per epoch."""
        return self.dataloader_config.use_seedable_sampler

    @property
    def non_blocking(self) -> bool:
        """Whether batches are copied to the device asynchronously."""
        return self.dataloader_config.non_blocking

    @property
    def use_stateful_dataloader(self) -> bool:
        """Whether data loaders are backed by torchdata's ``StatefulDataLoader``."""
        return self.dataloader_config.use_stateful_dataloader

    @property
    def project_dir(self) -> str | None:
        """The project folder (checkpoints, outputs)."""
        return self.project_configuration.project_dir

    @property
    def logging_dir(self) -> str | None:
        """The folder trackers log to."""
        return self.project_configuration.logging_dir

    @property
    def save_iteration(self) -> int:
        """The number the next automatically named checkpoint gets."""
        return self.project_configuration.iteration

    # --- gradient accumulation ----------------------------------------------------------------

    @property
    def sync_gradients(self) -> bool:
        """Whether this batch's backward synchronises gradients and the optimizer steps (settable)."""
        return self.gradient_state.sync_gradients

    @sync_gradients.setter
    def sync_gradients(self, sync_gradients: bool) -> None:
        self.gradient_state._set_sync_gradients(_bool(sync_gradients, "sync_gradients"))

    @property
    def gradient_accumulation_steps(self) -> int:
        """How many batches each optimizer step accumulates (settable)."""
        return self.gradient_state.num_steps

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigurationError(f"gradient_accumulation_steps={steps!r} must be an int of at least 1.")
        self.gradient_state.plugin_kwargs["num_steps"] = steps

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """Whether an optimizer skipped its last step because fp16 gradients overflowed."""
        return any(optimizer.step_was_skipped for optimizer in self._optimizers)

    def _do_sync(self) -> None:
        """Count a batch: gradients synchronise every ``gradient_accumulation_steps`` batches and at the
        end of the data loader."""
        gradient_state = self.gradient_state
        if gradient_state.sync_with_dataloader and gradient_state.end_of_dataloader:
            self.step = 0
            gradient_state._set_sync_gradients(True)
        else:
            self.step += 1
            gradient_state._set_sync_gradients(self.step % gradient_state.num_steps == 0)

    def _begin_batch(self) -> bool:
        """Count a batch; whether its backward must synchronise gradients."""
        self._do_sync()
        gradient_state = self.gradient_state
        return gradient_state.sync_gradients or (
            self._settings.use_distributed and gradient_state.sync_each_batch
        )

    def accumulate(self, *models: nn.Module) -> Accumulate:
        """Context for one batch of gradient accumulation: counts the batch, and unless it completes an
        accumulation (or ends the data loader), skips the models' gradient synchronisation."""
        return Accumulate(self, models)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Context in which ``model``'s backward passes do not synchronise gradients (DDP's ``no_sync``)."""
        return self._engine.no_sync(model)

    @staticmethod
    def trigger_sync_in_backward(model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context making the next backward of a DDP ``model`` synchronise, after forwards under
        ``no_sync``."""
        return trigger_sync_in_backward(model)

    # --- preparation --------------------------------------------------------------------------

    def prepare(self, *args: Any, device_placement: Sequence[bool] | None = None) -> Any:
        """Prepare models, optimizers, schedulers and data loaders, in any order and mix; returns them in
        the same order (one object alone, not in a tuple).

        Args:
            *args: the objects to prepare.
            device_placement: one bool per object: whether to move it to :attr:`device`.

        Raises:
            TypeError: an object is not one of those kinds.
            ConfigurationError: ``device_placement`` does not match ``args``, a model or optimizer
                was prepared already, or a scheduler's optimizer was not prepared.
        """
        if device_placement is None:
            placements: list[bool | None] = [None] * len(args)
        elif not isinstance(device_placement, (list, tuple)) or len(device_placement) != len(args):
            raise ConfigurationError(
                f"device_placement={device_placement!r} must be a list of {len(args)} bools, one per object "
                "passed."
            )
        else:
            placements = list(device_placement)
        result = self._engine.prepare(self, args, placements)
        return result[0] if len(result) == 1 else tuple(result)

    def prepare_model(
        self, model: nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False
    ) -> nn.Module:
        """Place ``model``, cast its forward under mixed precision, wrap it for the engine (not in
        ``evaluation_mode``) and compile it when a dynamo backend is set.

        Raises:
            TypeError: ``model`` is not a ``torch.nn.Module``.
            ConfigurationError: it was prepared already (use what ``prepare`` returned), or it was
                dispatched across devices (``device_map``) and several processes run.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"prepare_model takes a torch.nn.Module, got {type(model).__qualname__}.")
        if any(prepared is model for prepared in self._models):
            return model
        for prepared in self._models:
            if self._engine.unwrap(prepared, True, False) is model:
                raise ConfigurationError(
                    f"This {type(model).__qualname__} was prepared already, as a "
                    f"{type(prepared).__qualname__}; use the object prepare() returned instead of preparing "
                    "the model again."
                )
        if getattr(model, "_is_accelerate_prepared", False):  # prepared by another Accelerator
            self._models.append(model)
            return model
        dispatched = self.verify_device_map(model)
        if dispatched and self.use_distributed and not self._settings.bypass_device_map:
            raise ConfigurationError(
                f"{type(model).__qualname__} was dispatched across devices (device_map='auto'), which cannot "
                "be trained on several processes. Run one process, or load the model whole on each process."
            )
        if device_placement is None:
            device_placement = self.device_placement and self._engine.places_models
        model = self._engine.wrap_model(model, device_placement and not dispatched, evaluation_mode)
        if self._settings.compiles and not is_compiled_module(model):
            model = self._settings.dynamo_plugin.compile(model)
        model._is_accelerate_prepared = True  # type: ignore[assignment]
        self._models.append(model)
        return model

    def prepare_optimizer(
        self, optimizer: torch.optim.Optimizer, device_placement: bool | None = None
    ) -> Any:
        """Wrap ``optimizer`` in an :class:`~hasten.optimizer.AcceleratedOptimizer` (its state on the
        device when ``device_placement``).

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            ConfigurationError: it was prepared already.
        """
        if getattr(optimizer, "_is_accelerate_prepared", False):
            if not any(prepared is optimizer for prepared in self._optimizers):
                self._optimizers.append(optimizer)
            return optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"prepare_optimizer takes a torch.optim.Optimizer, got {type(optimizer).__qualname__}."
            )
        if any(prepared.optimizer is optimizer for prepared in self._optimizers):
            raise ConfigurationError(
                f"This {type(optimizer).__qualname__} was prepared already; use the object prepare() "
                "returned."
            )
        wrapped = self._engine.wrap_optimizer(
            optimizer, self.device_placement if device_placement is None else device_placement
        )
        wrapped._is_accelerate_prepared = True
        self._optimizers.append(wrapped)
        return wrapped

    def prepare_scheduler(self, scheduler: Any) -> AcceleratedScheduler:
        """Wrap a learning-rate ``scheduler`` in an :class:`~hasten.scheduler.AcceleratedScheduler` that
        follows its prepared optimizer.

        Raises:
            ConfigurationError: its optimizer was not prepared by this ``Accelerator`` (prepare it in
                the same call or before), or the scheduler was prepared already.
        """
        if isinstance(scheduler, AcceleratedScheduler) or getattr(
            scheduler, "_is_accelerate_prepared", False
        ):
            if not any(prepared is scheduler for prepared in self._schedulers):
                self._schedulers.append(scheduler)
            return scheduler
        if any(prepared.scheduler is scheduler for prepared in self._schedulers):
            raise ConfigurationError(
                f"This {type(scheduler).__qualname__} was prepared already; use the object prepare() "
                "returned."
            )
        inner = getattr(scheduler, "optimizer", None)
        optimizer = next((o for o in self._optimizers if o is inner or o.optimizer is inner), None)
        if optimizer is None:
            raise ConfigurationError(
                f"The {type(scheduler).__qualname__} steps a {type(inner).__qualname__} that this "
                "Accelerator has not prepared. Prepare the optimizer in the same call or before: `model, "
                "optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)`."
            )
        wrapped = self._engine.wrap_scheduler(
            scheduler, [optimizer], self.step_scheduler_with_optimizer, self.split_batches
        )
        wrapped._is_accelerate_prepared = True
        self._schedulers.append(wrapped)
        return wrapped

    def prepare_data_loader(
        self,
        data_loader: torch.utils.data.DataLoader[Any],
        device_placement: bool | None = None,
        slice_fn_for_dispatch: Callable[..., Any] | None = None,
    ) -> torch.utils.data.DataLoader[Any]:
        """Shard ``data_loader`` for this process (``hasten.data_loader.prepare_data_loader`` with the
        ``Accelerator``'s data-loader configuration); its batches land on :attr:`device` when
        ``device_placement``."""
        if getattr(data_loader, "_is_accelerate_prepared", False):
            if not any(prepared is data_loader for prepared in self._dataloaders):
                self._dataloaders.append(data_loader)
            return data_loader
        config = self.dataloader_config
        prepared = prepare_data_loader(
            data_loader,
            self.device,
            num_processes=self.num_processes,
            process_index=self.process_index,
            split_batches=config.split_batches,
            put_on_device=self.device_placement if device_placement is None else device_placement,
            rng_types=list(self.rng_types),
            dispatch_batches=config.dispatch_batches,
            even_batches=config.even_batches,
            slice_fn_for_dispatch=slice_fn_for_dispatch,
            use_seedable_sampler=config.use_seedable_sampler,
            data_seed=config.data_seed,
            non_blocking=config.non_blocking,
            use_stateful_dataloader=config.use_stateful_dataloader,
        )
        prepared._is_accelerate_prepared = True
        self._dataloaders.append(prepared)
        return prepared

    def skip_first_batches(
        self, dataloader: torch.utils.data.DataLoader[Any], num_batches: int = 0
    ) -> torch.utils.data.DataLoader[Any]:
        """A loader that leaves out the first ``num_batches`` of ``dataloader`` (to resume an epoch)."""
        return skip_first_batches(dataloader, num_batches=num_batches)

    # --- the training step --------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)`` for the configuration: divided by the accumulation steps, scaled
        under fp16.

        Raises:
            ValueError: ``loss`` is not a scalar and no ``gradient`` was passed.
        """
        try:
            self._engine.backward(loss, self.gradient_state.num_steps, **kwargs)
        except RuntimeError as error:
            if "gradient" not in kwargs and isinstance(loss, torch.Tensor) and loss.numel() != 1:
                raise ValueError(
                    f"backward: the loss has shape {tuple(loss.shape)}, not a single value. Reduce it first "
                    "(e.g. loss.mean()), or pass gradient= with the loss's shape."
                ) from error
            raise

    def autocast(
        self, autocast_handler: AutocastKwargs | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """Context running its block under the mixed precision (nothing without mixed precision);
        ``autocast_handler`` overrides the ``Accelerator``'s ``AutocastKwargs``."""
        return self._precision.autocast(autocast_handler)

    def unscale_gradients(self, optimizer: Any = None) -> None:
        """Divide the gradients by the fp16 loss scale (of ``optimizer``, or every prepared one)."""
        if optimizer is None:
            optimizers = self._optimizers
        else:
            optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        self._precision.unscale(optimizers)

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
        """Unscale, then clip the gradients' total norm to ``max_norm``; returns the norm before (a tensor;
        under DeepSpeed, which clips inside its step, the float norm of that step)."""
        return self._engine.clip_grad_norm_(parameters, max_norm, norm_type, self._optimizers)

    def clip_grad_value_(self, parameters: Any, clip_value: float) -> None:
        """Unscale, then clip every gradient value to ``[-clip_value, clip_value]``."""
        self._engine.clip_grad_value_(parameters, clip_value, self._optimizers)

    @property
    def deepspeed_engine_wrapped(self) -> Any:
        """Under DeepSpeed, the :class:`~hasten.utils.deepspeed.DeepSpeedEngineWrapper` that ``backward``
        drives (``None`` before ``prepare`` and with other engines)."""
        return getattr(self._engine, "wrapped", None)

    @property
    def deepspeed_config(self) -> dict[str, Any] | None:
        """Under DeepSpeed, the active plugin's config (its ``"auto"`` values filled by ``prepare``)."""
        plugin = self.state.deepspeed_plugin
        return None if plugin is None else plugin.deepspeed_config

    # --- models and memory --------------------------------------------------------------------

    def unwrap_model(
        self, model: nn.Module, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True
    ) -> nn.Module:
        """``model`` without what ``prepare`` wrapped around it (DDP, the DeepSpeed engine; the fp32 output
        wrapper and ``torch.compile`` unless kept). An FSDP2 model is sharded in place: it is returned."""
        return self._engine.unwrap(model, keep_fp32_wrapper, keep_torch_compile)

    def get_state_dict(self, model: nn.Module, unwrap: bool = True) -> dict[str, Any] | None:
        """The full state dict of a prepared ``model`` (keys of the unwrapped model when ``unwrap``).

        Under FSDP2 and ZeRO-3 it is gathered onto the main process (every process must call this), and
        the other processes get ``None``.
        """
        return self._engine.state_dict(model, unwrap)

    def verify_device_map(self, model: nn.Module) -> bool:
        """Whether ``model`` (or a submodule) was dispatched across several devices with a ``device_map``."""
        return any(len(getattr(module, "hf_device_map", ())) > 1 for module in model.modules())

    def free_memory(self, *objects: Any) -> list[None]:
        """Forget every prepared object, collect garbage and empty the device cache; pass your own
        references and rebind them to the result: ``model, optimizer = accelerator.free_memory(model,
        optimizer)``. Also resets :attr:`step`."""
        self._engine.release()
        self._models, self._optimizers, self._schedulers, self._dataloaders = [], [], [], []
        for obj in objects:  # being discarded: drop the mixed-precision forward, a reference cycle
            if isinstance(obj, nn.Module):
                self._engine.unwrap(obj, keep_fp32_wrapper=False, keep_torch_compile=False)
        self.step = 0
        return release_memory(*objects)

    def clear(self, *objects: Any) -> list[None]:
        """:meth:`free_memory`."""
        return self.free_memory(*objects)

    @contextlib.contextmanager
    def profile(self, profile_handler: ProfileKwargs | None = None) -> Iterator[Any]:
        """Profile the block with ``torch.profiler`` (yields the profiler); with ``output_trace_dir`` set,
        each process then writes its Chrome trace there."""
        handler = profile_handler or self.profile_handler or ProfileKwargs()
        with handler.build() as profiler:
            yield profiler
        if handler.output_trace_dir is not None:
            handler.export_trace(profiler, self.process_index)
            self.wait_for_everyone()

    @contextlib.contextmanager
    def maybe_context_parallel(
        self, buffers: Any = None, buffer_seq_dims: Any = None, no_restore_buffers: Any = None
    ) -> Iterator[None]:
        """Context parallelism's context; hasten has none, so the block runs as it is."""
        yield

    def __deepcopy__(self, memo: dict[int, Any]) -> Accelerator:
        return self

    def __repr__(self) -> str:
        return (
            f"Accelerator(engine={self._engine.name!r}, device={str(self.device)!r}, "
            f"num_processes={self.num_processes}, mixed_precision={self.mixed_precision!r}, "
            f"gradient_accumulation_steps={self.gradient_accumulation_steps})"
        )
