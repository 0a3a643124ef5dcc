"""hasten: run PyTorch on one process or many, with Accelerate's names and fewer surprises."""

# The utils facade loads first: its modules sit below `hasten.state` and everything that
# imports it, so starting here means no module is ever re-entered half-initialised.
# tests/api/test_imports.py imports every entry point first in a fresh interpreter.
import hasten.utils  # noqa: F401  isort: skip

from hasten.logging import get_logger
from hasten.state import AcceleratorState, GradientState, PartialState
from hasten.utils.dataclasses import (
    AutocastKwargs,
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    FP8RecipeKwargs,
    FullyShardedDataParallelPlugin,
    GradScalerKwargs,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    MegatronLMPlugin,
    ProfileKwargs,
    TorchDynamoPlugin,
)

__version__ = "0.1.0"

__all__ = [
    "AcceleratorState",
    "AutocastKwargs",
    "DeepSpeedPlugin",
    "DistributedDataParallelKwargs",
    "FP8RecipeKwargs",
    "FullyShardedDataParallelPlugin",
    "GradScalerKwargs",
    "GradientAccumulationPlugin",
    "GradientState",
    "InitProcessGroupKwargs",
    "MegatronLMPlugin",
    "PartialState",
    "ProfileKwargs",
    "TorchDynamoPlugin",
    "get_logger",
]
