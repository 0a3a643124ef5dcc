"""The FSDP2 engine: each process holds a shard of every parameter (``fully_shard``, DTensors).

``prepare`` shards models through :func:`~hasten.utils.fsdp2.fsdp2_prepare_model` (the plugin's wrap
policy, mixed-precision policy and offload; activation checkpointing first), then points every
optimizer built on the whole parameters at their shards. The optimizer may come in the same
``prepare`` call as its model or in a later one: the engine remembers, without keeping them alive,
which parameters sharding replaced. Mixed precision is FSDP's ``MixedPrecisionPolicy`` (the
forward is not wrapped in autocast, as in Accelerate); gradients are reduce-scattered in backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hasten.engines.base import CheckpointParts, Preparer, kind_of, refuse_unknown
from hasten.engines.single import SingleDeviceEngine
from hasten.optimizer import AcceleratedOptimizer
from hasten.state import AcceleratorState
from hasten.utils.errors import ConfigurationError
from hasten.utils.fsdp2 import (
    fsdp2_apply_ac,
    fsdp2_canonicalize_names,
    fsdp2_prepare_model,
    fsdp2_switch_optimizer_parameters,
)

if TYPE_CHECKING:
    from hasten.engines.connector import Settings
    from hasten.engines.precision import Precision

_ORDER = {"data_loader": 0, "model": 1, "optimizer": 2, "prepared": 2, "scheduler": 3}


class _GradientSyncOff:
    """Inside, an FSDP2 model's backward keeps its gradients unsharded and unreduced."""

    __slots__ = ("_model",)

    def __init__(self, model: Any) -> None:
        self._model = model

    def __enter__(self) -> None:
        self._model.set_requires_gradient_sync(False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._model.set_requires_gradient_sync(True)


def _fsdp_module(model: nn.Module) -> Any:
    """``model`` (or the module ``torch.compile`` wraps) when FSDP2 sharded it, else ``None``."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, FSDPModule) else None


def _grad_norms(groups: list[list[torch.Tensor]], norm_type: float) -> list[torch.Tensor]:
    """The norm of each group's gradients as a plain tensor (a DTensor norm is reduced over its mesh)."""
    from torch.distributed.tensor import DTensor

    norms = []
    for group in groups:
        grads = [p.grad for p in group if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return norms


def clip_grad_norm_dtensor(parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over gradients that may be DTensors on several meshes (and plain
    tensors): one norm over all of them, returned as a plain tensor.

    Gradients of one mesh reduce their norm over that mesh (one all-reduce of a scalar); the
    per-group norms are then combined (the p-norm of the norms), and every gradient's local part is
    scaled by the same factor, as torch scales whole tensors (the same values bit for bit).
    """
    from torch.distributed.tensor import DTensor

    by_mesh: dict[Any, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for parameter in [parameters] if isinstance(parameters, torch.Tensor) else parameters:
        if parameter.grad is None:
            continue
        if isinstance(parameter.grad, DTensor):
            by_mesh.setdefault(parameter.grad.device_mesh, []).append(parameter)
        else:
            plain.append(parameter)
    groups = list(by_mesh.values()) + ([plain] if plain else [])
    if not groups:
        return torch.tensor(0.0)
    norms = _grad_norms(groups, norm_type)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), norm_type)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    with torch.no_grad():
        for group in groups:
            for parameter in group:
                grad: Any = parameter.grad
                local = grad.to_local() if isinstance(grad, DTensor) else grad
                by_device.setdefault(local.device, []).append(local)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, coefficient.to(device))
    return total


class FSDP2Engine(SingleDeviceEngine):
    """Fully sharded data parallel training with ``torch.distributed.fsdp.fully_shard``."""

    name = "FSDP2"
    places_models = False

    def __init__(self, settings: Settings, precision: Precision) -> None:
        super().__init__(settings, precision)
        self.state = AcceleratorState()
        # id(parameter before sharding) -> (weak reference to it, weak reference to its shard)
        self._replaced: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor]]] = {}

    # --- preparation ------------------------------------------------------------------------

    def prepare(
        self, preparer: Preparer, objects: Sequence[Any], placements: Sequence[bool | None]
    ) -> list[Any]:
        """Data loaders, then models (sharded), then optimizers (switched to the shards), then schedulers."""
        refuse_unknown(objects)
        result = list(objects)
        order = sorted(range(len(objects)), key=lambda i: _ORDER.get(kind_of(objects[i]) or "", 4))
        for index in order:
            obj, placement, kind = result[index], placements[index], kind_of(result[index])
            if kind == "data_loader":
                result[index] = preparer.prepare_data_loader(obj, device_placement=placement)
            elif kind == "model":
                result[index] = preparer.prepare_model(obj, device_placement=placement)
            elif kind == "optimizer":
                result[index] = preparer.prepare_optimizer(obj, device_placement=placement)
            elif kind == "scheduler":
                result[index] = preparer.prepare_scheduler(obj)
        return result

    def wrap_model(self, model: nn.Module, device_placement: bool, evaluation_mode: bool) -> nn.Module:
        """Shard ``model`` as the FSDP plugin says (activation checkpointing first); in ``evaluation_mode``
        only place it and cast its forward.

        Raises:
            ConfigurationError: a parameter has no counterpart after sharding (the message names it).
        """
        if evaluation_mode:
            return super().wrap_model(model, device_placement, evaluation_mode)
        plugin = self.state.fsdp_plugin
        if plugin.activation_checkpointing and _fsdp_module(model) is None:
            fsdp2_apply_ac(self.state, model)
        before = fsdp2_canonicalize_names(dict(model.named_parameters()))
        model = fsdp2_prepare_model(self.state, model)
        after = fsdp2_canonicalize_names(dict(model.named_parameters()))
        missing = sorted(set(before) - set(after))
        if missing:
            raise ConfigurationError(
                f"After FSDP2 sharding, {type(model).__qualname__} no longer has the parameters "
                f"{missing[:10]}; "
                "the optimizer could not follow them. Were weights tied (or untied) during preparation? Tie "
                "them before prepare(), or build the optimizer after it from the prepared model."
            )
        for name, old in before.items():
            new = after[name]
            if new is not old:
                self._replaced[id(old)] = (weakref.ref(old), weakref.ref(new))
        return model

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, device_placement: bool
    ) -> AcceleratedOptimizer:
        """An :class:`AcceleratedOptimizer` over the shards of the parameters it was built on.

        Raises:
            ValueError: the optimizer already stepped on the whole parameters (its state cannot be sharded).
        """
        self._forget_dead()
        mapping: dict[Any, Any] = {}
        switched = False
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                entry = self._replaced.get(id(parameter))
                new = entry[1]() if entry is not None and entry[0]() is parameter else None
                mapping[parameter] = parameter if new is None else new
                switched = switched or new is not None
        if switched:
            fsdp2_switch_optimizer_parameters(optimizer, mapping)
        return super().wrap_optimizer(optimizer, device_placement)

    def _forget_dead(self) -> None:
        dead = [key for key, (old, new) in self._replaced.items() if old() is None or new() is None]
        for key in dead:
            del self._replaced[key]

    # --- per step ---------------------------------------------------------------------------

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Backward passes inside keep their gradients local (``set_requires_gradient_sync(False)``)."""
        sharded = _fsdp_module(model)
        return super().no_sync(model) if sharded is None else _GradientSyncOff(sharded)

    def clip_grad_norm_(
        self, parameters: Any, max_norm: float, norm_type: float, optimizers: Sequence[Any]
    ) -> torch.Tensor:
        """Unscale, then clip the total norm of gradients that are shards (DTensors) or whole tensors; returns
        the total norm before clipping as a plain tensor, the same on every process."""
        self.precision.unscale(optimizers)
        return clip_grad_norm_dtensor(parameters, max_norm, norm_type)

    # --- whole model ------------------------------------------------------------------------

    def state_dict(self, model: nn.Module, unwrap: bool) -> dict[str, Any] | None:
        """The full state dict, gathered onto the main process's CPU; ``None`` on the other processes.

        Every process must call it (it gathers the shards).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if unwrap:
            model = self.unwrap(model, keep_fp32_wrapper=True, keep_torch_compile=False)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(model, options=options)
        return state_dict if self.settings.process_index == 0 else None

    def checkpoint_parts(
        self, models: Sequence[nn.Module], optimizers: Sequence[Any], schedulers: Sequence[Any]
    ) -> CheckpointParts:
        """Models and optimizers are saved by :meth:`save_checkpoint` (sharded or full, as the plugin
        says)."""
        return CheckpointParts([], [], list(schedulers))

    def _checkpoint_each(
        self,
        folder: Path,
        models: Sequence[nn.Module],
        optimizers: Sequence[Any],
        model_io: Any,
        optimizer_io: Any,
    ) -> None:
        """Call ``model_io`` on each model and ``optimizer_io`` on each optimizer with the model at its
        index (the last one when there are fewer models), as Accelerate pairs them.

        Raises:
            ConfigurationError: optimizers are prepared without any model.
        """
        if optimizers and not models:
            raise ConfigurationError(
                "save_state / load_state under FSDP2: the optimizer state is keyed by the sharded model's "
                "parameter names, and no model is prepared. Prepare the model with the optimizer."
            )
        plugin = self.state.fsdp_plugin
        for index, model in enumerate(models):
            model_io(plugin, self.state, model, folder, index)
        for index, optimizer in enumerate(optimizers):
            inner = getattr(optimizer, "optimizer", optimizer)
            optimizer_io(plugin, self.state, inner, models[min(index, len(models) - 1)], folder, index)

    def save_checkpoint(
        self, folder: Path, models: Sequence[nn.Module], optimizers: Sequence[Any], kwargs: dict[str, Any]
    ) -> None:
        """Each model and the optimizer at its index, through ``hasten.utils.fsdp_checkpoint``
        (Accelerate's files: ``pytorch_model_fsdp_<i>`` / ``optimizer_<i>`` folders, or ``.bin`` files
        for full state dicts)."""
        from hasten.utils.fsdp_checkpoint import save_fsdp_model, save_fsdp_optimizer

        self._checkpoint_each(folder, models, optimizers, save_fsdp_model, save_fsdp_optimizer)

    def load_checkpoint(
        self, folder: Path, models: Sequence[nn.Module], optimizers: Sequence[Any], kwargs: dict[str, Any]
    ) -> None:
        """Load what :meth:`save_checkpoint` wrote (a missing file is an error on every rank)."""
        from hasten.utils.fsdp_checkpoint import load_fsdp_model, load_fsdp_optimizer

        self._checkpoint_each(folder, models, optimizers, load_fsdp_model, load_fsdp_optimizer)

    def release(self) -> None:
        """Forget the parameters sharding replaced."""
        self._replaced.clear()
