"""The DDP engine: ``DistributedDataParallel`` over the process group (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hasten.engines.single import SingleDeviceEngine
from hasten.utils.errors import ConfigurationError
from hasten.utils.parallel import model_has_dtensor


class DDPEngine(SingleDeviceEngine):
    """Data parallel training: every process holds the model; gradients are averaged in backward."""

    name = "DDP"

    def wrap_model(self, model: nn.Module, device_placement: bool, evaluation_mode: bool) -> nn.Module:
        """Place and cast ``model``, then wrap it in ``DistributedDataParallel`` (with the DDP kwargs and
        comm hook).

        A model in ``evaluation_mode``, or with no parameter to train, is not wrapped.

        Raises:
            ConfigurationError: the model holds ``DTensor`` parameters (already sharded).
        """
        model = super().wrap_model(model, device_placement, evaluation_mode)
        if evaluation_mode or not any(parameter.requires_grad for parameter in model.parameters()):
            return model
        if model_has_dtensor(model):
            raise ConfigurationError(
                f"{type(model).__qualname__} holds DTensor parameters, which DistributedDataParallel cannot "
                "wrap (was it loaded with device_map='auto' or sharded already?). Load it whole on each "
                "process."
            )
        settings = self.settings
        handler = settings.handlers.ddp
        kwargs = {} if handler is None else handler.to_kwargs()
        device = settings.device
        ids = None
        if device.type != "cpu" and device.index is not None and not settings.bypass_device_map:
            ids = [device.index]
        wrapped = DistributedDataParallel(
            model, device_ids=ids, output_device=ids[0] if ids else None, **kwargs
        )
        if handler is not None:
            handler.register_comm_hook(wrapped)
        return wrapped

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """``DistributedDataParallel.no_sync`` (nothing for a model DDP does not wrap)."""
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return super().no_sync(model)


@contextlib.contextmanager
def trigger_sync_in_backward(model: nn.Module) -> Iterator[None]:
    """Make the next backward of a DDP ``model`` synchronise, after forwards run under ``no_sync``."""
    if not isinstance(model, DistributedDataParallel):
        yield
        return
    backward_sync, forward_sync = model.require_backward_grad_sync, model.require_forward_param_sync
    model.require_backward_grad_sync = True
    model.require_forward_param_sync = True
    model.reducer.prepare_for_backward([])
    try:
        yield
    finally:
        model.require_backward_grad_sync = backward_sync
        model.require_forward_param_sync = forward_sync
