"""Enums, kwargs handlers, plugins and configurations (re-exported; see the submodules)."""

from hasten.utils.batches import (
    TensorInformation,
)
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
    EnumWithContains,
    FP8BackendType,
    LoggerType,
    PrecisionType,
    RNGType,
    SageMakerDistributedType,
)
from hasten.utils.dataclasses.kwargs import (
    AORecipeKwargs,
    AutocastKwargs,
    DistributedDataParallelKwargs,
    FP8RecipeKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    KwargsHandler,
    MSAMPRecipeKwargs,
    ProfileKwargs,
    TERecipeKwargs,
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
from hasten.utils.dataclasses.plugins.megatron_models import (
    add_model_config_to_megatron_parser,
    parse_bert_config,
    parse_glm4_moe_config,
    parse_gpt2_config,
    parse_llama_config,
    parse_t5_config,
)
from hasten.utils.dataclasses.plugins.parallelism import (
    TorchContextParallelConfig,
    TorchTensorParallelConfig,
    TorchTensorParallelPlugin,
)
from hasten.utils.dataclasses.plugins.sequence_parallel import (
    DeepSpeedSequenceParallelConfig,
)

__all__ = [
    "AORecipeKwargs",
    "AutocastKwargs",
    "BaseEnum",
    "BnbQuantizationConfig",
    "ComputeEnvironment",
    "CustomDtype",
    "DDPCommunicationHookType",
    "DataLoaderConfiguration",
    "DeepSpeedPlugin",
    "DeepSpeedSequenceParallelConfig",
    "DistributedDataParallelKwargs",
    "DistributedType",
    "DynamoBackend",
    "EnumWithContains",
    "FP8BackendType",
    "FP8RecipeKwargs",
    "FullyShardedDataParallelPlugin",
    "GradScalerKwargs",
    "GradientAccumulationPlugin",
    "HfDeepSpeedConfig",
    "InitProcessGroupKwargs",
    "KwargsHandler",
    "LoggerType",
    "MSAMPRecipeKwargs",
    "MegatronLMPlugin",
    "PrecisionType",
    "ProfileKwargs",
    "ProjectConfiguration",
    "RNGType",
    "SageMakerDistributedType",
    "TERecipeKwargs",
    "TensorInformation",
    "TorchContextParallelConfig",
    "TorchDynamoPlugin",
    "TorchTensorParallelConfig",
    "TorchTensorParallelPlugin",
    "add_model_config_to_megatron_parser",
    "get_module_class_from_name",
    "parse_bert_config",
    "parse_glm4_moe_config",
    "parse_gpt2_config",
    "parse_llama_config",
    "parse_t5_config",
]
