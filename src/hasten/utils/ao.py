"""FP8 training with torchao: which linear layers to convert, and the conversion.

The first and the last linear layers stay in high precision (training is unstable otherwise), and
so do layers whose dimensions are not multiples of 16 (``torch._scaled_mm`` needs them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from hasten.utils.imports import torchao_required


def find_first_last_linear_layers(model: nn.Module) -> tuple[str | None, str | None]:
    """The names of the first and the last ``nn.Linear`` of ``model`` (``None`` when it has none)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return (names[0], names[-1]) if names else (None, None)


def filter_linear_layers(module: nn.Module, fqn: str, layers_to_filter: list[str]) -> bool:
    """Whether torchao may convert ``module`` (named ``fqn``): not one of ``layers_to_filter``, and, for
    an ``nn.Linear``, both dimensions multiples of 16."""
    if isinstance(module, nn.Linear) and (module.in_features % 16 or module.out_features % 16):
        return False
    return fqn not in layers_to_filter


def filter_first_and_last_linear_layers(module: nn.Module, fqn: str) -> bool:
    """:func:`filter_linear_layers` with the first and last linear layers *inside* ``module`` excluded.

    A torchao filter only sees one module and its name, not the model, so this cannot know which
    layers are the model's first and last; ``convert_model_to_fp8_ao`` excludes those itself.
    """
    first, last = find_first_last_linear_layers(module)
    return filter_linear_layers(module, fqn, layers_to_filter=[name for name in (first, last) if name])


@torchao_required
def has_ao_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds torchao ``Float8Linear`` layers."""
    from torchao.float8.float8_linear import Float8Linear

    return any(isinstance(module, Float8Linear) for module in model.modules())


@torchao_required
def convert_model_to_fp8_ao(
    model: nn.Module, config: Any = None, module_filter_func: Callable[..., bool] | None = None
) -> None:
    """Replace the ``nn.Linear`` layers of ``model`` in place by torchao's ``Float8Linear``.

    Args:
        model: the model to convert.
        config: a ``torchao.float8.Float8LinearConfig`` (torchao's default when ``None``).
        module_filter_func: ``(module, name) -> bool`` choosing the layers to convert; by default
            every linear layer with dimensions divisible by 16 except the first and the last.
    """
    from torchao.float8 import convert_to_float8_training

    if module_filter_func is None:
        first, last = find_first_last_linear_layers(model)
        module_filter_func = functools.partial(
            filter_linear_layers, layers_to_filter=[name for name in (first, last) if name]
        )
    convert_to_float8_training(model, module_filter_fn=module_filter_func, config=config)
