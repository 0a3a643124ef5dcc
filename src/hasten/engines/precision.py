"""Mixed precision for the engines: no casting, bf16 autocast, or fp16 autocast with a gradient scaler.

One :class:`Precision` is chosen when the ``Accelerator`` is built. It casts a model's
forward once, at ``prepare`` time (autocast around it, float32 outputs), scales the loss in
``backward`` and unscales before clipping; none of its per-step methods probes anything.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hasten.optimizer import AcceleratedOptimizer
from hasten.utils.amp import get_grad_scaler, get_mixed_precision_context_manager
from hasten.utils.dataclasses.enums import DistributedType, PrecisionType
from hasten.utils.dataclasses.kwargs import AutocastKwargs, GradScalerKwargs
from hasten.utils.errors import ConfigurationError
from hasten.utils.precision import convert_outputs_to_fp32

# Devices whose autocast runs fp16 (with a gradient scaler).
_FP16_DEVICES = ("cuda", "xpu", "npu", "mlu", "musa", "hpu", "sdaa", "mps")
_NULL = contextlib.nullcontext()


class AutocastForward:
    """A model's ``forward`` run under one autocast context (picklable, unlike a closure).

    ``__wrapped__`` is the original forward, so ``unwrap_model(keep_fp32_wrapper=False)`` finds it.
    """

    def __init__(self, forward: Callable[..., Any], context: contextlib.AbstractContextManager[Any]) -> None:
        self.forward = forward
        self.context = context
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.context:
            return self.forward(*args, **kwargs)


class Precision:
    """How forward passes are cast and losses scaled, fixed for the ``Accelerator``'s life.

    Args:
        mode: the mixed precision.
        device: the device this process computes on.
        distributed_type: the engine's type (for the sharded scaler under FSDP).
        engine_casts: the engine does mixed precision itself (DeepSpeed): nothing is wrapped.
        autocast_handler: what to change in ``torch.autocast``.
        scaler_handler: what to change in the gradient scaler (fp16).

    Raises:
        ConfigurationError: fp16 on a device without fp16 autocast (the CPU), or fp8 (no FP8
            engine runs without NVIDIA GPUs). bf16 on a GPU without it fails in ``torch.autocast``.
    """

    def __init__(
        self,
        mode: PrecisionType,
        device: torch.device,
        distributed_type: DistributedType,
        engine_casts: bool = False,
        autocast_handler: AutocastKwargs | None = None,
        scaler_handler: GradScalerKwargs | None = None,
    ) -> None:
        self.mode = mode
        self.autocast_handler = autocast_handler
        self.scaler: torch.amp.GradScaler | None = None
        self.native_amp = False
        if mode == PrecisionType.FP8:
            raise ConfigurationError(
                "mixed_precision='fp8' needs TransformerEngine, MS-AMP or torchao FP8 on NVIDIA GPUs, and "
                f"this process computes on {device.type!r}. Use mixed_precision='bf16' instead."
            )
        if engine_casts or mode == PrecisionType.NO:
            return
        if mode == PrecisionType.FP16:
            if device.type not in _FP16_DEVICES:
                raise ConfigurationError(
                    f"mixed_precision='fp16' needs one of the devices {list(_FP16_DEVICES)}, but this "
                    f"process computes on {device.type!r}. Use mixed_precision='bf16' there (or 'no')."
                )
            kwargs = {} if scaler_handler is None else scaler_handler.to_kwargs()
            self.scaler = get_grad_scaler(distributed_type, **kwargs)
        self.native_amp = True

    def autocast(
        self, autocast_handler: AutocastKwargs | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """The autocast context for this precision (a no-op context without mixed precision)."""
        if not self.native_amp:
            return _NULL
        handler = self.autocast_handler if autocast_handler is None else autocast_handler
        return get_mixed_precision_context_manager(True, handler)

    def wrap_forward(self, model: nn.Module) -> None:
        """Run ``model.forward`` under autocast with float32 outputs (in place; nothing without mixed
        precision).

        The original is kept as ``model._original_forward``, as Accelerate keeps it.
        """
        if not self.native_amp:
            return
        forward = model.forward
        model._original_forward = forward  # type: ignore[assignment]
        model.forward = convert_outputs_to_fp32(AutocastForward(forward, self.autocast()))

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``, through the gradient scaler when there is one."""
        if self.scaler is None:
            loss.backward(**kwargs)
        else:
            self.scaler.scale(loss).backward(**kwargs)

    def unscale(self, optimizers: Iterable[Any]) -> None:
        """Divide the gradients of ``optimizers`` by the loss scale (nothing without a scaler)."""
        if self.scaler is None:
            return
        for optimizer in optimizers:
            while isinstance(optimizer, AcceleratedOptimizer):
                optimizer = optimizer.optimizer
            self.scaler.unscale_(optimizer)
