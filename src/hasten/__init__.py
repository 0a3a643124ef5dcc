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
    GradientAccumulationPlugin,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    MegatronLMPlugin,
    ProfileKwargs,
    TorchDynamoPlugin,
)

__version__ = "0.1.0"
from hasten.accelerator import Accelerator
from hasten.big_modeling import (
    cpu_offload,
    cpu_offload_with_hook,
    disk_offload,
    dispatch_model,
    init_empty_weights,
    init_on_device,
    load_checkpoint_and_dispatch,
)
from hasten.data_loader import skip_first_batches
from hasten.inference import (
    prepare_pippy,
)
from hasten.launchers import (
    debug_launcher,
    notebook_launcher,
)
from hasten.parallelism_config import (
    ParallelismConfig,
)
from hasten.utils.dataclasses.configs import (
    DataLoaderConfiguration,
)
from hasten.utils.dataclasses.enums import (
    DDPCommunicationHookType,
    DistributedType,
)
from hasten.utils.device_map import (
    infer_auto_device_map,
)
from hasten.utils.imports import (
    is_rich_available,
)
from hasten.utils.loading import (
    load_checkpoint_in_model,
)
from hasten.utils.memory import (
    find_executable_batch_size,
)
from hasten.utils.random import (
    synchronize_rng_states,
)

__all__ = [
    "Accelerator",
    "AcceleratorState",
    "AutocastKwargs",
    "DDPCommunicationHookType",
    "DataLoaderConfiguration",
    "DeepSpeedPlugin",
    "DistributedDataParallelKwargs",
    "DistributedType",
    "FP8RecipeKwargs",
    "FullyShardedDataParallelPlugin",
    "GradScalerKwargs",
    "GradientAccumulationPlugin",
    "GradientState",
    "InitProcessGroupKwargs",
    "MegatronLMPlugin",
    "ParallelismConfig",
    "PartialState",
    "ProfileKwargs",
    "TorchDynamoPlugin",
    "cpu_offload",
    "cpu_offload_with_hook",
    "debug_launcher",
    "disk_offload",
    "dispatch_model",
    "find_executable_batch_size",
    "get_logger",
    "infer_auto_device_map",
    "init_empty_weights",
    "init_on_device",
    "is_rich_available",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "notebook_launcher",
    "prepare_pippy",
    "skip_first_batches",
    "synchronize_rng_states",
]
