"""FP8 training recipes, one per engine: TransformerEngine, MS-AMP and torchao.

``FP8RecipeKwargs`` (in ``kwargs.py``) is Accelerate's older, combined recipe. TransformerEngine
and MS-AMP need NVIDIA GPUs, so their recipes are chosen and validated here without importing the
engine; torchao runs on the CPU too, and ``AORecipeKwargs`` builds its ``Float8LinearConfig``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hasten.utils.dataclasses._env import (
    env_field,
    non_negative_int,
    one_of,
    positive_int,
    resolve_fields,
    to_bool,
)
from hasten.utils.dataclasses.kwargs import (
    _ENV_FP8,
    KwargsHandler,
    _linear_precision,
    linear_precision_from_env,
)
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import require


@dataclass
class TERecipeKwargs(KwargsHandler):
    """TransformerEngine's delayed-scaling FP8 recipe; unset fields come from ``ACCELERATE_FP8_*``.

    Args:
        use_autocast_during_eval: keep FP8 autocast in evaluation too.
        margin: margin for the scaling factor.
        interval: steps between scaling-factor updates.
        fp8_format: ``"HYBRID"`` (E4M3 forward, E5M2 backward), ``"E4M3"`` or ``"E5M2"``.
        amax_history_len: how many amax values the scaling factor looks back on.
        amax_compute_algo: ``"max"`` or ``"most_recent"``.
        override_linear_precision: run the (fprop, dgrad, wgrad) GEMMs in higher precision.
        use_mxfp8_block_scaling: MXFP8 block scaling (Blackwell GPUs).
    """

    use_autocast_during_eval: bool | None = env_field(_ENV_FP8 + "USE_AUTOCAST_DURING_EVAL", False, to_bool)
    margin: int | None = env_field(_ENV_FP8 + "MARGIN", 0, non_negative_int)
    interval: int | None = env_field(_ENV_FP8 + "INTERVAL", 1, positive_int)
    fp8_format: str | None = env_field(_ENV_FP8 + "FORMAT", "HYBRID", one_of(["HYBRID", "E4M3", "E5M2"]))
    amax_history_len: int | None = env_field(_ENV_FP8 + "AMAX_HISTORY_LEN", 1024, positive_int)
    amax_compute_algo: str | None = env_field(
        _ENV_FP8 + "AMAX_COMPUTE_ALGO", "most_recent", one_of(["max", "most_recent"])
    )
    override_linear_precision: tuple[bool, bool, bool] | None = env_field(
        None, (False, False, False), _linear_precision
    )
    use_mxfp8_block_scaling: bool | None = env_field(_ENV_FP8 + "USE_MXFP8_BLOCK_SCALING", False, to_bool)

    def __post_init__(self) -> None:
        if self.override_linear_precision is None:
            self.override_linear_precision = linear_precision_from_env()
        resolve_fields(self)


@dataclass
class MSAMPRecipeKwargs(KwargsHandler):
    """MS-AMP's FP8 recipe: ``opt_level`` ``"O1"`` (FP8 weights and gradients) or ``"O2"`` (also the
    optimizer states); unset, ``ACCELERATE_FP8_OPT_LEVEL`` or ``"O2"``."""

    opt_level: str | None = env_field(_ENV_FP8 + "OPT_LEVEL", "O2", one_of(["O1", "O2"], lower=False))

    def __post_init__(self) -> None:
        resolve_fields(self)


@dataclass
class AORecipeKwargs(KwargsHandler):
    """torchao's FP8 training recipe.

    Args:
        config: a ``torchao.float8.Float8LinearConfig``; when ``None``, one is built from
            ``pad_inner_dim`` and ``enable_fsdp_float8_all_gather``.
        module_filter_func: ``(module, fully qualified name) -> bool``: which layers to convert
            (default: ``hasten.utils.ao.filter_linear_layers`` without the first and last layers).
        pad_inner_dim: pad matrix dimensions to multiples of 16 (``ACCELERATE_FP8_PAD_INNER_DIM``,
            default true), as ``torch._scaled_mm`` needs.
        enable_fsdp_float8_all_gather: all-gather FSDP2 parameters in FP8
            (``ACCELERATE_FP8_ENABLE_FSDP_FLOAT8_ALL_GATHER``, default true).

    Raises:
        ImportError: torchao is not installed (the message says how to install it).
    """

    config: Any = None
    module_filter_func: Callable[..., bool] | None = None
    pad_inner_dim: bool | None = env_field(_ENV_FP8 + "PAD_INNER_DIM", True, to_bool)
    enable_fsdp_float8_all_gather: bool | None = env_field(
        _ENV_FP8 + "ENABLE_FSDP_FLOAT8_ALL_GATHER", True, to_bool
    )

    def __post_init__(self) -> None:
        require("torchao", purpose="AORecipeKwargs (torchao FP8 training)")
        resolve_fields(self)
        if self.module_filter_func is not None and not callable(self.module_filter_func):
            raise ConfigurationError(
                f"module_filter_func={self.module_filter_func!r} must be a function (module, name) -> bool."
            )
        if self.config is None:
            from torchao.float8 import Float8LinearConfig

            self.config = Float8LinearConfig(
                pad_inner_dim=self.pad_inner_dim,
                enable_fsdp_float8_all_gather=self.enable_fsdp_float8_all_gather,
            )
