"""hasten's kwargs handlers and plugins against Accelerate's: same to_kwargs() and the same reading of the
environment, over a corpus of settings. Cases where hasten departs on purpose are left out and listed in
docs/design.md."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from typing import Any

import pytest

accelerate_utils = pytest.importorskip("accelerate.utils")

import hasten.utils as hasten_utils  # noqa: E402
from hasten.utils.environment import patch_environment  # noqa: E402


def _plain(value: Any) -> Any:
    """Enums by value, torch enums by name, so both libraries' objects compare."""
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, str) else value.name
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


TO_KWARGS = [
    ("AutocastKwargs", {}),
    ("AutocastKwargs", {"cache_enabled": True}),
    ("AutocastKwargs", {"enabled": False, "cache_enabled": False}),
    ("GradScalerKwargs", {}),
    ("GradScalerKwargs", {"init_scale": 1024.0, "growth_interval": 100}),
    ("GradScalerKwargs", {"backoff_factor": 0.25, "enabled": False}),
    ("DistributedDataParallelKwargs", {}),
    ("DistributedDataParallelKwargs", {"find_unused_parameters": True, "bucket_cap_mb": 50}),
    ("DistributedDataParallelKwargs", {"static_graph": True, "comm_hook": "fp16"}),
    ("DistributedDataParallelKwargs", {"gradient_as_bucket_view": True, "broadcast_buffers": False}),
    ("InitProcessGroupKwargs", {}),
    ("InitProcessGroupKwargs", {"backend": "gloo"}),
    ("InitProcessGroupKwargs", {"timeout": datetime.timedelta(seconds=30)}),
    ("InitProcessGroupKwargs", {"backend": "gloo", "init_method": "tcp://127.0.0.1:23456"}),
    ("ProfileKwargs", {}),
    ("ProfileKwargs", {"activities": ["cpu"], "record_shapes": True}),
    ("ProfileKwargs", {"schedule_option": {"wait": 1, "warmup": 1, "active": 2}, "with_flops": True}),
    ("GradientAccumulationPlugin", {}),
    ("GradientAccumulationPlugin", {"num_steps": 4}),
    ("GradientAccumulationPlugin", {"num_steps": 2, "adjust_scheduler": False, "sync_each_batch": True}),
    ("TorchDynamoPlugin", {}),
    ("TorchDynamoPlugin", {"backend": "inductor"}),
    ("TorchDynamoPlugin", {"backend": "INDUCTOR", "mode": "max-autotune", "fullgraph": True}),
    ("TorchDynamoPlugin", {"backend": "eager", "dynamic": False, "use_regional_compilation": True}),
    ("TorchDynamoPlugin", {"backend": "aot_eager", "options": {"trace.enabled": True}, "disable": True}),
]


@pytest.mark.parametrize(("name", "kwargs"), TO_KWARGS)
def test_to_kwargs_agree(name: str, kwargs: dict[str, Any]) -> None:
    ours = getattr(hasten_utils, name)(**kwargs).to_kwargs()
    theirs = getattr(accelerate_utils, name)(**kwargs).to_kwargs()
    assert _plain(ours) == _plain(theirs)


ENVIRONMENTS = [
    ("TorchDynamoPlugin", {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, {}),
    (
        "TorchDynamoPlugin",
        {
            "ACCELERATE_DYNAMO_BACKEND": "EAGER",
            "ACCELERATE_DYNAMO_MODE": "reduce-overhead",
            "ACCELERATE_DYNAMO_USE_FULLGRAPH": "true",
            "ACCELERATE_DYNAMO_USE_DYNAMIC": "False",
        },
        {},
    ),
    ("TorchDynamoPlugin", {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, {"backend": "eager"}),
    ("TorchDynamoPlugin", {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1"}, {}),
    ("DeepSpeedPlugin", {}, {}),
    (
        "DeepSpeedPlugin",
        {
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
            "ACCELERATE_GRADIENT_CLIPPING": "0.5",
        },
        {},
    ),
    (
        "DeepSpeedPlugin",
        {
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_NVME_PATH": "/nvme",
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
        },
        {"zero_stage": 3},
    ),
    (
        "DeepSpeedPlugin",
        {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
        {"zero_stage": 0, "gradient_clipping": 1.0},
    ),
    ("DeepSpeedPlugin", {"ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}, {"zero_stage": 3}),
    ("FullyShardedDataParallelPlugin", {}, {}),
    (
        "FullyShardedDataParallelPlugin",
        {
            "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP",
            "FSDP_OFFLOAD_PARAMS": "true",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            "FSDP_BACKWARD_PREFETCH": "BACKWARD_POST",
        },
        {},
    ),
    (
        "FullyShardedDataParallelPlugin",
        {
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block,Layer",
            "FSDP_USE_ORIG_PARAMS": "true",
            "FSDP_ACTIVATION_CHECKPOINTING": "true",
        },
        {},
    ),
    (
        "FullyShardedDataParallelPlugin",
        {
            "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP",
            "FSDP_MIN_NUM_PARAMS": "1000",
            "FSDP_SHARDING_STRATEGY": "2",
        },
        {},
    ),
    (
        "FullyShardedDataParallelPlugin",
        {"FSDP_SHARDING_STRATEGY": "NO_SHARD"},
        {"sharding_strategy": "HYBRID_SHARD"},
    ),
    ("FullyShardedDataParallelPlugin", {"FSDP_SHARDING_STRATEGY": "hybrid_shard_zero2"}, {}),
    (
        "FullyShardedDataParallelPlugin",
        {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_OFFLOAD_PARAMS": "true"},
        {},
    ),
    (
        "FullyShardedDataParallelPlugin",
        {"FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"},
        {"mixed_precision_policy": "bf16"},
    ),
    ("MegatronLMPlugin", {}, {}),
    (
        "MegatronLMPlugin",
        {
            "MEGATRON_LM_TP_DEGREE": "2",
            "MEGATRON_LM_PP_DEGREE": "2",
            "MEGATRON_LM_NUM_MICRO_BATCHES": "4",
            "MEGATRON_LM_GRADIENT_CLIPPING": "0.5",
            "MEGATRON_LM_SEQUENCE_PARALLELISM": "true",
            "MEGATRON_LM_RECOMPUTE_ACTIVATIONS": "true",
            "MEGATRON_LM_USE_DISTRIBUTED_OPTIMIZER": "false",
        },
        {},
    ),
    (
        "MegatronLMPlugin",
        {
            "MEGATRON_LM_TP_DEGREE": "4",
            "MEGATRON_LM_ATTENTION_DROPOUT": "0.1",
            "MEGATRON_LM_RECOMPUTE_GRANULARITY": "selective",
        },
        {"tp_degree": 2},
    ),
]

# Fields compared per plugin (objects that hold callables or torch configs compare by their settings).
FIELDS = {
    "TorchDynamoPlugin": [
        "backend",
        "mode",
        "fullgraph",
        "dynamic",
        "options",
        "disable",
        "use_regional_compilation",
    ],
    "DeepSpeedPlugin": [
        "gradient_accumulation_steps",
        "gradient_clipping",
        "zero_stage",
        "offload_optimizer_device",
        "offload_param_device",
        "offload_optimizer_nvme_path",
        "offload_param_nvme_path",
        "zero3_init_flag",
        "zero3_save_16bit_model",
        "enable_msamp",
        "msamp_opt_level",
        "deepspeed_config",
    ],
    "FullyShardedDataParallelPlugin": [
        "fsdp_version",
        "sharding_strategy",
        "reshard_after_forward",
        "backward_prefetch",
        "cpu_offload",
        "state_dict_type",
        "use_orig_params",
        "sync_module_states",
        "forward_prefetch",
        "activation_checkpointing",
        "transformer_cls_names_to_wrap",
        "min_num_params",
        "mixed_precision_policy",
    ],
    "MegatronLMPlugin": ["megatron_lm_default_args"],
}


def _settings(plugin: Any, fields: list[str]) -> dict[str, Any]:
    settings = {}
    for field in fields:
        value = getattr(plugin, field)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = (type(value).__name__, dataclasses.asdict(value))
        elif type(value).__module__.startswith("torch.distributed.fsdp"):
            value = (type(value).__name__, getattr(value, "offload_params", None), repr(value))
        settings[field] = _plain(value)
    if hasattr(plugin, "auto_wrap_policy"):
        settings["auto_wrap_policy"] = getattr(plugin.auto_wrap_policy, "__name__", plugin.auto_wrap_policy)
    return settings


@pytest.mark.parametrize(("name", "environment", "kwargs"), ENVIRONMENTS)
def test_environment_is_read_the_same_way(
    name: str, environment: dict[str, str], kwargs: dict[str, Any]
) -> None:
    with patch_environment(**environment):
        ours = getattr(hasten_utils, name)(**kwargs)
        theirs = getattr(accelerate_utils, name)(**kwargs)
    assert _settings(ours, FIELDS[name]) == _settings(theirs, FIELDS[name])


def test_to_kwargs_agree_when_the_environment_sets_the_dynamo_backend() -> None:
    with patch_environment(ACCELERATE_DYNAMO_BACKEND="INDUCTOR", ACCELERATE_DYNAMO_MODE="max-autotune"):
        ours, theirs = hasten_utils.TorchDynamoPlugin(), accelerate_utils.TorchDynamoPlugin()
    assert ours.to_kwargs() == theirs.to_kwargs() == {"backend": "inductor", "mode": "max-autotune"}


CONFIGS = [
    ("DataLoaderConfiguration", {}),
    ("DataLoaderConfiguration", {"split_batches": True, "dispatch_batches": False, "data_seed": 3}),
    ("ProjectConfiguration", {"project_dir": "/tmp/project"}),
    (
        "ProjectConfiguration",
        {"project_dir": "/tmp/p", "logging_dir": "/tmp/l", "total_limit": 2, "iteration": 5},
    ),
    ("BnbQuantizationConfig", {"load_in_8bit": True}),
    (
        "BnbQuantizationConfig",
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bf16"},
    ),
    ("BnbQuantizationConfig", {"load_in_8bit": True, "torch_dtype": "fp32", "skip_modules": ["lm_head"]}),
]


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_configurations_agree(name: str, kwargs: dict[str, Any]) -> None:
    ours = getattr(hasten_utils, name)(**kwargs)
    theirs = getattr(accelerate_utils, name)(**kwargs)
    assert _plain(vars(ours)) == _plain(vars(theirs))
