"""Mixed-precision helpers: the autocast context for the state's precision, and a gradient scaler for the
device."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from hasten.state import AcceleratorState
from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.dataclasses.kwargs import AutocastKwargs
from hasten.utils.device import accelerator_type

# Engines that cast by themselves: autocast keeps the device's default dtype there.
_OWN_CASTING = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def get_mixed_precision_context_manager(
    native_amp: bool = False, autocast_kwargs: AutocastKwargs | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A ``torch.autocast`` for the state's mixed precision on its device, or a no-op context.

    Args:
        native_amp: whether mixed precision is on; ``False`` gives ``contextlib.nullcontext()``.
        autocast_kwargs: what to change in ``torch.autocast`` (only its non-default fields are passed).
    """
    if not native_amp:
        return contextlib.nullcontext()
    state = AcceleratorState()
    kwargs = {} if autocast_kwargs is None else autocast_kwargs.to_kwargs()
    device_type = state.device.type
    if state.mixed_precision == "fp16":
        return torch.autocast(device_type=device_type, dtype=torch.float16, **kwargs)
    if state.mixed_precision in ("bf16", "fp8") and state.distributed_type not in _OWN_CASTING:
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, **kwargs)
    return torch.autocast(device_type=device_type, **kwargs)


def get_grad_scaler(distributed_type: DistributedType | None = None, **kwargs: Any) -> torch.amp.GradScaler:
    """A gradient scaler for the accelerator present (the CPU included); FSDP gets the sharded one.

    Args:
        distributed_type: ``DistributedType.FSDP`` selects ``ShardedGradScaler``.
        **kwargs: ``GradScaler`` arguments, as :class:`~hasten.utils.dataclasses.GradScalerKwargs` produces
            them.
    """
    device = accelerator_type()
    if distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device, **kwargs)
    return torch.amp.GradScaler(device, **kwargs)
