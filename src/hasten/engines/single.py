"""The single-device engine: one process, no wrapper; also the base of the DDP engine."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from hasten.engines.base import Engine

_NULL = contextlib.nullcontext()


class SingleDeviceEngine(Engine):
    """Train on this process's device alone: place, cast, and run torch's own backward and clipping."""

    name = "single device"

    def wrap_model(self, model: nn.Module, device_placement: bool, evaluation_mode: bool) -> nn.Module:
        """Cast ``model``'s forward and move it to the device (nothing else on one device)."""
        self.precision.wrap_forward(model)
        if device_placement:
            model = model.to(self.settings.device)
        return model

    def backward(self, loss: torch.Tensor, accumulation_steps: int, **kwargs: Any) -> None:
        """``loss / accumulation_steps`` backward (no division for one step), scaled under fp16."""
        if accumulation_steps != 1:
            loss = loss / accumulation_steps
        self.precision.backward(loss, **kwargs)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Nothing to skip on one device."""
        return _NULL

    def clip_grad_norm_(
        self, parameters: Any, max_norm: float, norm_type: float, optimizers: Sequence[Any]
    ) -> torch.Tensor:
        """Unscale, then ``torch.nn.utils.clip_grad_norm_``."""
        self.precision.unscale(optimizers)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters: Any, clip_value: float, optimizers: Sequence[Any]) -> None:
        """Unscale, then ``torch.nn.utils.clip_grad_value_``."""
        self.precision.unscale(optimizers)
        torch.nn.utils.clip_grad_value_(parameters, clip_value)

    def state_dict(self, model: nn.Module, unwrap: bool) -> dict[str, Any] | None:
        """``model.state_dict()``, unwrapped first (compile included: no ``_orig_mod.`` prefix) when asked."""
        if unwrap:
            model = self.unwrap(model, keep_fp32_wrapper=True, keep_torch_compile=False)
        return model.state_dict()
