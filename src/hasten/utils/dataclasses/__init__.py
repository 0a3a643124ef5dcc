"""Enums, kwargs handlers, plugins and configurations (re-exported; see the submodules)."""

from hasten.utils.dataclasses.configs import (
    BnbQuantizationConfig,
    DataLoaderConfiguration,
    ProjectConfiguration,
)
from hasten.utils.dataclasses.enums import (
    BaseEnum,
    ComputeEnvironment,
    CustomDtype,
    DDPCommunicationHookType,
    DistributedType,
    DynamoBackend,
    FP8BackendType,
    LoggerType,
    PrecisionType,
    RNGType,
    SageMakerDistributedType,
)
from hasten.utils.dataclasses.kwargs import (
    AutocastKwargs,
    DistributedDataParallelKwargs,
    FP8RecipeKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    KwargsHandler,
    ProfileKwargs,
)
from hasten.utils.dataclasses.plugins.deepspeed import (
    DeepSpeedPlugin,
)
from hasten.utils.dataclasses.plugins.deepspeed_config import (
    HfDeepSpeedConfig,
)
from hasten.utils.dataclasses.plugins.dynamo import (
    TorchDynamoPlugin,
)
from hasten.utils.dataclasses.plugins.fsdp import (
    FullyShardedDataParallelPlugin,
)
from hasten.utils.dataclasses.plugins.fsdp_wrap import (
    get_module_class_from_name,
)
from hasten.utils.dataclasses.plugins.gradient import (
    GradientAccumulationPlugin,
)
from hasten.utils.dataclasses.plugins.megatron import (
    MegatronLMPlugin,
)

__all__ = [
    "AutocastKwargs",
    "BaseEnum",
    "BnbQuantizationConfig",
    "ComputeEnvironment",
    "CustomDtype",
    "DDPCommunicationHookType",
    "DataLoaderConfiguration",
    "DeepSpeedPlugin",
    "DistributedDataParallelKwargs",
    "DistributedType",
    "DynamoBackend",
    "FP8BackendType",
    "FP8RecipeKwargs",
    "FullyShardedDataParallelPlugin",
    "GradScalerKwargs",
    "GradientAccumulationPlugin",
    "HfDeepSpeedConfig",
    "InitProcessGroupKwargs",
    "KwargsHandler",
    "LoggerType",
    "MegatronLMPlugin",
    "PrecisionType",
    "ProfileKwargs",
    "ProjectConfiguration",
    "RNGType",
    "SageMakerDistributedType",
    "TorchDynamoPlugin",
    "get_module_class_from_name",
]
