"""Layerwise casting: weights stored in a low-precision dtype, each layer upcast only while it computes.

A model kept in ``float8_e4m3fn`` takes half the memory of ``bfloat16``; with a
:class:`LayerwiseCastingHook` on each compute layer (linear and convolution layers), a layer's
weights are cast to the compute dtype just before its ``forward`` and back right after, so only
one layer at a time exists in the compute dtype. Precision is lost in the round trip to storage
(that is the trade), and layers such as normalisations are best skipped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hasten.hooks import ModelHook, add_hook_to_module

logger = logging.getLogger(__name__)

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
"""The layers that get a hook: those whose weights dominate memory and that compute in one call."""


def _floating(dtype: Any, name: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{name}={dtype!r} must be a floating torch.dtype (e.g. torch.float8_e4m3fn for storage, "
            "torch.bfloat16 for compute)."
        )
    return dtype


class LayerwiseCastingHook(ModelHook):
    """Keep a module's floating weights in ``storage_dtype``, cast to ``compute_dtype`` for each ``forward``.

    Args:
        storage_dtype: the dtype the weights are kept in between calls.
        compute_dtype: the dtype they are cast to for the duration of ``forward``.
        non_blocking: cast asynchronously with respect to the host (accelerator memory).
    """

    _is_stateful = False

    def __init__(self, storage_dtype: torch.dtype, compute_dtype: torch.dtype, non_blocking: bool) -> None:
        self.storage_dtype = _floating(storage_dtype, "storage_dtype")
        self.compute_dtype = _floating(compute_dtype, "compute_dtype")
        self.non_blocking = non_blocking
        self._casts: tuple[Callable[[nn.Module], None], Callable[[nn.Module], None]] | None = None

    def __repr__(self) -> str:
        return f"LayerwiseCastingHook(storage_dtype={self.storage_dtype}, compute_dtype={self.compute_dtype})"

    def _cast(self, module: nn.Module, dtype: torch.dtype) -> None:
        module.to(dtype=dtype, non_blocking=self.non_blocking)

    def _compiled_out(self) -> tuple[Callable[[nn.Module], None], Callable[[nn.Module], None]]:
        """The two casts, excluded from ``torch.compile`` graphs (made on first use: importing the compiler
        at import time would slow down ``import hasten``)."""
        if self._casts is None:
            self._casts = (
                torch.compiler.disable(lambda module: self._cast(module, self.compute_dtype)),
                torch.compiler.disable(lambda module: self._cast(module, self.storage_dtype)),
            )
        return self._casts

    def init_hook(self, module: nn.Module) -> nn.Module:
        self._cast(module, self.storage_dtype)
        return module

    def pre_forward(
        self, module: nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self._compiled_out()[0](module)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self._compiled_out()[1](module)
        return output


def attach_layerwise_casting_hooks(
    module: nn.Module,
    storage_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    skip_modules_pattern: str | Sequence[str] | None = None,
    skip_modules_classes: tuple[type[nn.Module], ...] | None = None,
    non_blocking: bool = False,
) -> None:
    """Store ``module``'s compute layers (linear and convolution layers) in ``storage_dtype`` and run each in
    ``compute_dtype``, one :class:`LayerwiseCastingHook` per layer.

    Args:
        module: the model (or any module); changed in place.
        storage_dtype: e.g. ``torch.float8_e4m3fn``.
        compute_dtype: e.g. ``torch.bfloat16``.
        skip_modules_pattern: regular expressions (one string or several); a submodule whose full
            name matches one (``re.search``) is left as it is, with everything inside it.
        skip_modules_classes: submodule classes left as they are, with everything inside them.
        non_blocking: cast asynchronously with respect to the host.

    A hook is appended after any hook a layer already has (e.g. an offloading one).
    """
    _floating(storage_dtype, "storage_dtype")
    _floating(compute_dtype, "compute_dtype")
    patterns = (
        (skip_modules_pattern,)
        if isinstance(skip_modules_pattern, str)
        else tuple(skip_modules_pattern or ())
    )
    skip_classes = tuple(skip_modules_classes or ())

    def visit(name: str, current: nn.Module) -> None:
        if isinstance(current, skip_classes) or any(re.search(pattern, name) for pattern in patterns):
            logger.debug('Skipping layerwise casting for layer "%s"', name)
            return
        if isinstance(current, SUPPORTED_LAYERS):
            add_hook_to_module(
                current,
                LayerwiseCastingHook(storage_dtype, compute_dtype, non_blocking),
                append=True,
            )
            return
        for child_name, child in current.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", module)
