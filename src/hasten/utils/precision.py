"""Bringing half-precision outputs back to float32, for code that runs a model under autocast.

:func:`convert_outputs_to_fp32` wraps a model's ``forward`` in a
:class:`ConvertOutputsToFp32` object rather than a closure, so a model that
carries the wrapper can still be pickled (``torch.save(model)``, sending it to
``spawn``-ed workers). Accelerate's wrapper refuses to be pickled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from hasten.utils.tree import tree_map

_HALF = (torch.float16, torch.bfloat16)


def _is_half(node: Any) -> bool:
    return getattr(node, "dtype", None) in _HALF


def _to_fp32(node: Any) -> Any:
    return node.float() if node.dtype in _HALF else node


def convert_to_fp32(tensor: Any) -> Any:
    """``tensor`` (a nested structure) with every float16 / bfloat16 tensor converted to float32.

    Other tensors and objects are returned as they are.

    >>> convert_to_fp32({"y": torch.ones(1, dtype=torch.float16)})["y"].dtype
    torch.float32
    """
    return tree_map(_to_fp32, tensor, is_leaf=_is_half, caller="convert_to_fp32", argument="tensor")


class ConvertOutputsToFp32:
    """A callable that runs ``model_forward`` and converts its half-precision outputs to float32.

    It pickles with the function it wraps (a bound ``forward`` pickles with its module), and
    ``__wrapped__`` points to that function so unwrapping code can find the original.
    """

    def __init__(self, model_forward: Callable[..., Any]) -> None:
        self.model_forward = model_forward
        functools.update_wrapper(self, model_forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return convert_to_fp32(self.model_forward(*args, **kwargs))

    def __repr__(self) -> str:
        return f"ConvertOutputsToFp32({self.model_forward!r})"


def convert_outputs_to_fp32(model_forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``model_forward`` so that its float16 / bfloat16 outputs come back as float32 (picklable)."""
    return ConvertOutputsToFp32(model_forward)
