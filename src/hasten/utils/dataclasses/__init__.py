"""Enums, kwargs handlers, plugins and configurations (re-exported; see the submodules)."""

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
from hasten.utils.dataclasses.configs import (
    BnbQuantizationConfig,
    DataLoaderConfiguration,
    ProjectConfiguration,
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
from hasten.utils.dataclasses.plugins.dynamo import (
    TorchDynamoPlugin,
)
from hasten.utils.dataclasses.plugins.gradient import (
    GradientAccumulationPlugin,
)

__all__ = [
    "AutocastKwargs",
    "BaseEnum",
    "BnbQuantizationConfig",
    "ComputeEnvironment",
    "CustomDtype",
    "DDPCommunicationHookType",
    "DataLoaderConfiguration",
    "DistributedDataParallelKwargs",
    "DistributedType",
    "DynamoBackend",
    "FP8BackendType",
    "FP8RecipeKwargs",
    "GradScalerKwargs",
    "GradientAccumulationPlugin",
    "InitProcessGroupKwargs",
    "KwargsHandler",
    "LoggerType",
    "PrecisionType",
    "ProfileKwargs",
    "ProjectConfiguration",
    "RNGType",
    "SageMakerDistributedType",
    "TorchDynamoPlugin",
]
