"""The engine interface: what the ``Accelerator`` asks of a single device, DDP, FSDP2 or DeepSpeed.

The ``Accelerator`` builds exactly one engine when it is constructed (``connector.py`` picks the
class from the distributed type) and calls it without asking which one it is. Every engine
offers the same operations:

Preparation (once per object):
    ``prepare(preparer, objects, placements) -> list``
        The whole ``Accelerator.prepare(*objects)`` call, results in the same order. The default
        prepares data loaders, models and optimizers one by one through the preparer's
        ``prepare_data_loader`` / ``prepare_model`` / ``prepare_optimizer``, then the schedulers
        (they must find their optimizer prepared), and refuses objects it does not know.
        Engines that must see several objects at once override it. FSDP2 shards the models
        first, then points each optimizer at the shards of the parameters it was built on
        (``fsdp2_switch_optimizer_parameters``; in the same call or a later one). DeepSpeed hands
        model, optimizer and scheduler (``DummyOptim`` / ``DummyScheduler`` placeholders
        included) to ``deepspeed.initialize`` together, then registers what it returns with the
        preparer.
    ``wrap_model(model, device_placement, evaluation_mode) -> nn.Module``
        Place the model, cast its forward (``self.precision.wrap_forward``) and wrap it for the
        engine (DDP, ``fully_shard``); ``evaluation_mode`` skips the engine's wrapper.
        ``torch.compile`` comes after, applied by the ``Accelerator`` the same way for every engine.
    ``wrap_optimizer(optimizer, device_placement) -> AcceleratedOptimizer``
    ``wrap_scheduler(scheduler, optimizers, step_with_optimizer, split_batches) -> AcceleratedScheduler``

Per step (straight-line code: no probing, no ``inspect``, no environment reads):
    ``backward(loss, accumulation_steps, **kwargs)``
        Divide the loss by the accumulation steps (not when there is one), then run backward
        through the precision (the gradient scaler under fp16). DeepSpeed's engine divides and
        scales by itself.
    ``no_sync(model) -> context manager``
        Skip gradient synchronisation inside (DDP: ``require_backward_grad_sync``; FSDP2:
        ``set_requires_gradient_sync(False)``; DeepSpeed below ZeRO-2: its own accumulation).
    ``clip_grad_norm_(parameters, max_norm, norm_type, optimizers) -> Tensor | None``
        Unscale the optimizers' gradients first, then clip (FSDP2: DTensor-aware; DeepSpeed
        clips inside its step and returns its global norm).
    ``clip_grad_value_(parameters, clip_value, optimizers)``

Whole model:
    ``state_dict(model, unwrap) -> dict | None``
        The full state dict (FSDP2 and ZeRO-3 gather it on the main process); ``None`` on a
        process that has nothing to save.
    ``unwrap(model, keep_fp32_wrapper, keep_torch_compile) -> nn.Module``
    ``release()``: drop what the engine holds (DeepSpeed destroys its engine), for ``free_memory``.

Checkpoints (``save_state`` / ``load_state``; every process calls them):
    ``checkpoint_parts(models, optimizers, schedulers) -> CheckpointParts``
        What the generic training-state files hold (``model*.safetensors``, ``optimizer*.bin``,
        ``scheduler*.bin``): everything by default; FSDP2 and DeepSpeed keep models and
        optimizers out and save them themselves.
    ``save_checkpoint(folder, models, optimizers, kwargs)`` / ``load_checkpoint(...)``
        Write or read what the engine keeps itself (FSDP2: ``pytorch_model_fsdp*`` and
        ``optimizer*`` through ``hasten.utils.fsdp_checkpoint``; DeepSpeed: its engine's own
        ``save_checkpoint`` / ``load_checkpoint`` folder ``pytorch_model*``); nothing by default.

Adding an engine: subclass :class:`Engine` (or ``SingleDeviceEngine``) in its own module here,
map its ``DistributedType`` to it in ``connector.ENGINES``, drop it from
``connector._refuse_engines_not_built``, and resolve its plugin in ``plugins.py`` (passed on
to ``AcceleratorState`` by ``connector.connect``). Everything the ``Accelerator`` keeps about prepared
objects (``_models``, ``_optimizers``, ``_schedulers``, ``_dataloaders``) is filled by the
``prepare_*`` methods an engine calls back, so checkpointing sees every engine's objects the
same way.

Class attributes say what the engine decides for itself: ``places_models`` (``False`` when
the engine places the parameters, as FSDP2 does) and ``casts_itself`` (``True`` when the
engine does mixed precision, as DeepSpeed does: the precision then wraps nothing). An engine
that cannot honour a per-object ``device_placement`` (DeepSpeed) refuses it in its ``prepare``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from hasten.optimizer import AcceleratedOptimizer
from hasten.scheduler import AcceleratedScheduler
from hasten.utils.compilation import is_compiled_module
from hasten.utils.parallel import extract_model_from_parallel

if TYPE_CHECKING:
    from hasten.engines.connector import Settings
    from hasten.engines.precision import Precision

_KNOWN = (
    "models (torch.nn.Module), optimizers (torch.optim.Optimizer), learning-rate schedulers "
    "(torch.optim.lr_scheduler.LRScheduler) and data loaders (torch.utils.data.DataLoader)"
)


class Preparer(Protocol):
    """What an engine's :meth:`Engine.prepare` may call back: the ``Accelerator``'s ``prepare_*``."""

    step_scheduler_with_optimizer: bool

    @property
    def split_batches(self) -> bool: ...

    def prepare_model(
        self, model: nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False
    ) -> nn.Module: ...

    def prepare_optimizer(self, optimizer: Any, device_placement: bool | None = None) -> Any: ...

    def prepare_scheduler(self, scheduler: Any) -> Any: ...

    def prepare_data_loader(
        self, data_loader: Any, device_placement: bool | None = None, slice_fn_for_dispatch: Any = None
    ) -> Any: ...


def kind_of(obj: Any) -> str | None:
    """``"data_loader"``, ``"model"``, ``"optimizer"``, ``"scheduler"``, ``"prepared"`` or ``None``."""
    if isinstance(obj, torch.utils.data.DataLoader):
        return "data_loader"
    if isinstance(obj, nn.Module):
        return "model"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
        return "scheduler"
    if isinstance(obj, AcceleratedScheduler) or getattr(obj, "_is_accelerate_prepared", False):
        return "prepared"
    return None


def refuse_unknown(objects: Sequence[Any]) -> None:
    """Raise ``TypeError`` naming the first object ``prepare`` does not know."""
    for position, obj in enumerate(objects):
        if kind_of(obj) is None:
            raise TypeError(
                f"prepare: argument {position} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                f"the Accelerator does not know how to prepare. It prepares {_KNOWN}; use other objects as "
                "they are, without passing them to prepare()."
            )


@dataclass(frozen=True)
class CheckpointParts:
    """The models, optimizers and schedulers whose state goes into the generic checkpoint files."""

    models: list[nn.Module]
    optimizers: list[Any]
    schedulers: list[Any]


class Engine(abc.ABC):
    """One way of running the training step, chosen once per ``Accelerator`` (see the module docstring)."""

    name: ClassVar[str]
    places_models: ClassVar[bool] = True
    casts_itself: ClassVar[bool] = False

    def __init__(self, settings: Settings, precision: Precision) -> None:
        self.settings = settings
        self.precision = precision

    # --- preparation ------------------------------------------------------------------------

    def prepare(
        self, preparer: Preparer, objects: Sequence[Any], placements: Sequence[bool | None]
    ) -> list[Any]:
        """Prepare data loaders, models and optimizers in order, then schedulers (see the module
        docstring)."""
        refuse_unknown(objects)
        first: list[Any] = []
        for obj, placement in zip(objects, placements):
            kind = kind_of(obj)
            if kind == "data_loader":
                obj = preparer.prepare_data_loader(obj, device_placement=placement)
            elif kind == "model":
                obj = preparer.prepare_model(obj, device_placement=placement)
            elif kind == "optimizer":
                obj = preparer.prepare_optimizer(obj, device_placement=placement)
            first.append(obj)
        return [preparer.prepare_scheduler(obj) if kind_of(obj) == "scheduler" else obj for obj in first]

    @abc.abstractmethod
    def wrap_model(self, model: nn.Module, device_placement: bool, evaluation_mode: bool) -> nn.Module:
        """Place ``model``, cast its forward and wrap it for this engine."""

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, device_placement: bool
    ) -> AcceleratedOptimizer:
        """An :class:`AcceleratedOptimizer` stepping through the precision's scaler."""
        return AcceleratedOptimizer(
            optimizer, device_placement=device_placement, scaler=self.precision.scaler
        )

    def wrap_scheduler(
        self, scheduler: Any, optimizers: list[Any], step_with_optimizer: bool, split_batches: bool
    ) -> AcceleratedScheduler:
        """An :class:`AcceleratedScheduler` that steps when ``optimizers`` step."""
        return AcceleratedScheduler(
            scheduler, optimizers, step_with_optimizer=step_with_optimizer, split_batches=split_batches
        )

    # --- per step ---------------------------------------------------------------------------

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, accumulation_steps: int, **kwargs: Any) -> None:
        """Backward pass of ``loss`` divided by ``accumulation_steps``."""

    @abc.abstractmethod
    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """A context in which backward passes do not synchronise ``model``'s gradients."""

    @abc.abstractmethod
    def clip_grad_norm_(
        self, parameters: Any, max_norm: float, norm_type: float, optimizers: Sequence[Any]
    ) -> torch.Tensor | None:
        """Unscale, then clip the gradients' total norm; returns the norm before clipping."""

    @abc.abstractmethod
    def clip_grad_value_(self, parameters: Any, clip_value: float, optimizers: Sequence[Any]) -> None:
        """Unscale, then clip each gradient value to ``[-clip_value, clip_value]``."""

    # --- whole model ------------------------------------------------------------------------

    @abc.abstractmethod
    def state_dict(self, model: nn.Module, unwrap: bool) -> dict[str, Any] | None:
        """The model's full state dict, or ``None`` where this process has nothing to save."""

    def unwrap(self, model: nn.Module, keep_fp32_wrapper: bool, keep_torch_compile: bool) -> nn.Module:
        """``model`` without the engine's wrappers (and the precision / compile ones unless kept).

        A compiled model is never changed: when the compiled module wraps an engine wrapper
        (``compile(DDP(model))``), a new compiled module around the bare model is returned, so
        the prepared one keeps synchronising gradients.
        """
        bare = extract_model_from_parallel(model, keep_fp32_wrapper, keep_torch_compile=False)
        if not keep_torch_compile or not is_compiled_module(model):
            return bare
        if model._orig_mod is bare:
            return model
        return type(model)(bare, model.dynamo_ctx)

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint_parts(
        self, models: Sequence[nn.Module], optimizers: Sequence[Any], schedulers: Sequence[Any]
    ) -> CheckpointParts:
        """What the generic checkpoint files hold: everything, unless the engine saves it itself."""
        return CheckpointParts(list(models), list(optimizers), list(schedulers))

    def save_checkpoint(  # noqa: B027  (an optional hook: single device and DDP save nothing themselves)
        self, folder: Path, models: Sequence[nn.Module], optimizers: Sequence[Any], kwargs: dict[str, Any]
    ) -> None:
        """Write into ``folder`` what :meth:`checkpoint_parts` keeps out of the generic files."""

    def load_checkpoint(  # noqa: B027
        self, folder: Path, models: Sequence[nn.Module], optimizers: Sequence[Any], kwargs: dict[str, Any]
    ) -> None:
        """Load from ``folder`` what :meth:`save_checkpoint` wrote."""

    def release(self) -> None:  # noqa: B027  (an optional hook: most engines hold nothing)
        """Drop whatever the engine holds for the objects it prepared."""
