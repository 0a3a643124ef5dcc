"""Mixed precision: the autocast context and the gradient scaler for the current state."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from hasten.state import AcceleratorState
from hasten.utils.dataclasses.enums import DistributedType, PrecisionType
from hasten.utils.dataclasses.kwargs import AutocastKwargs

_AUTOCAST_DTYPES = {
    PrecisionType.FP16: torch.float16,
    PrecisionType.BF16: torch.bfloat16,
    PrecisionType.FP8: torch.bfloat16,  # FP8 engines compute the rest of the model in bf16
}


def get_mixed_precision_context_manager(
    native_amp: bool = False, autocast_kwargs: AutocastKwargs | None = None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on the state's device in its mixed precision (``fp16``, ``bf16``; ``fp8`` runs
    the rest in bf16), or a context that does nothing when ``native_amp`` is false or precision is ``no``."""
    state = AcceleratorState()
    precision = PrecisionType.parse(state.mixed_precision, "mixed_precision")
    if not native_amp or precision == PrecisionType.NO:
        return contextlib.nullcontext()
    options = (autocast_kwargs or AutocastKwargs()).to_kwargs()
    return torch.autocast(device_type=state.device.type, dtype=_AUTOCAST_DTYPES[precision], **options)


def get_grad_scaler(distributed_type: DistributedType | None = None, **kwargs: Any) -> Any:
    """A gradient scaler for fp16 training on the state's device, with ``GradScalerKwargs``-style ``kwargs``.

    FSDP (``distributed_type=DistributedType.FSDP``) gets torch's sharded scaler, which unscales
    sharded gradients correctly.
    """
    state = AcceleratorState()
    device = state.device.type
    if distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device, **kwargs)
    return torch.amp.GradScaler(device, **kwargs)
