"""Names on disk and other fixed values shared with Accelerate.

File names match Accelerate's exactly so that checkpoints and training states
written by either library are found by the other.
"""

from __future__ import annotations

from typing import NamedTuple

MODEL_NAME = "pytorch_model"
SAFE_MODEL_NAME = "model"
OPTIMIZER_NAME = "optimizer"
RNG_STATE_NAME = "random_states"
SCALER_NAME = "scaler.pt"
SCHEDULER_NAME = "scheduler"
SAMPLER_NAME = "sampler"
PROFILE_PATTERN_NAME = "profile_{suffix}.json"
WEIGHTS_NAME = f"{MODEL_NAME}.bin"
WEIGHTS_PATTERN_NAME = "pytorch_model{suffix}.bin"
WEIGHTS_INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
SAFE_WEIGHTS_NAME = f"{SAFE_MODEL_NAME}.safetensors"
SAFE_WEIGHTS_PATTERN_NAME = "model{suffix}.safetensors"
SAFE_WEIGHTS_INDEX_NAME = f"{SAFE_WEIGHTS_NAME}.index.json"
FSDP_MODEL_NAME = "pytorch_model_fsdp"

FSDP_SHARDING_STRATEGY = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]
FSDP_AUTO_WRAP_POLICY = ["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"]
FSDP_BACKWARD_PREFETCH = ["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"]
FSDP_STATE_DICT_TYPE = ["FULL_STATE_DICT", "LOCAL_STATE_DICT", "SHARDED_STATE_DICT"]
FSDP2_STATE_DICT_TYPE = ["SHARDED_STATE_DICT", "FULL_STATE_DICT"]
TORCH_DYNAMO_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
DEEPSPEED_MULTINODE_LAUNCHERS = ["pdsh", "standard", "openmpi", "mvapich", "mpich", "nossh", "slurm"]


class LaunchVariable(NamedTuple):
    """One environment variable ``hasten launch`` writes (as ``accelerate launch`` does), and who reads it."""

    option: str
    """The ``hasten launch`` flag (without ``--``) and the launch config file's key."""
    variable: str
    """The environment variable the launcher writes for it."""
    reader: str
    """The class that reads the variable when the argument is not passed."""
    field: str
    """The reader's argument (or attribute) the variable fills."""


_FSDP, _DEEPSPEED, _DYNAMO = "FullyShardedDataParallelPlugin", "DeepSpeedPlugin", "TorchDynamoPlugin"
_PARALLEL, _SEQUENCE = "ParallelismConfig", "DeepSpeedSequenceParallelConfig"

# The one table of these names: the launcher writes from it, the plugins and the state read through it.
LAUNCH_VARIABLES: tuple[LaunchVariable, ...] = (
    LaunchVariable("mixed_precision", "ACCELERATE_MIXED_PRECISION", "AcceleratorState", "mixed_precision"),
    LaunchVariable("cpu", "ACCELERATE_USE_CPU", "PartialState", "cpu"),
    LaunchVariable("debug", "ACCELERATE_DEBUG_MODE", "PartialState", "debug"),
    # The engine flags stand in for the plugin argument: the state's distributed type follows either.
    LaunchVariable("use_fsdp", "ACCELERATE_USE_FSDP", "AcceleratorState", "fsdp_plugin"),
    LaunchVariable("use_deepspeed", "ACCELERATE_USE_DEEPSPEED", "AcceleratorState", "deepspeed_plugin"),
    LaunchVariable(
        "gradient_accumulation_steps",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "GradientAccumulationPlugin",
        "num_steps",
    ),
    LaunchVariable(
        "gradient_accumulation_steps",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        _DEEPSPEED,
        "gradient_accumulation_steps",
    ),
    LaunchVariable("dynamo_backend", "ACCELERATE_DYNAMO_BACKEND", _DYNAMO, "backend"),
    LaunchVariable("dynamo_mode", "ACCELERATE_DYNAMO_MODE", _DYNAMO, "mode"),
    LaunchVariable("dynamo_use_fullgraph", "ACCELERATE_DYNAMO_USE_FULLGRAPH", _DYNAMO, "fullgraph"),
    LaunchVariable("dynamo_use_dynamic", "ACCELERATE_DYNAMO_USE_DYNAMIC", _DYNAMO, "dynamic"),
    LaunchVariable(
        "dynamo_use_regional_compilation",
        "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION",
        _DYNAMO,
        "use_regional_compilation",
    ),
    LaunchVariable("fsdp_version", "FSDP_VERSION", _FSDP, "fsdp_version"),
    LaunchVariable("fsdp_sharding_strategy", "FSDP_SHARDING_STRATEGY", _FSDP, "sharding_strategy"),
    LaunchVariable(
        "fsdp_reshard_after_forward", "FSDP_RESHARD_AFTER_FORWARD", _FSDP, "reshard_after_forward"
    ),
    LaunchVariable("fsdp_offload_params", "FSDP_OFFLOAD_PARAMS", _FSDP, "cpu_offload"),
    LaunchVariable("fsdp_min_num_params", "FSDP_MIN_NUM_PARAMS", _FSDP, "min_num_params"),
    LaunchVariable("fsdp_auto_wrap_policy", "FSDP_AUTO_WRAP_POLICY", _FSDP, "auto_wrap_policy"),
    LaunchVariable(
        "fsdp_transformer_layer_cls_to_wrap",
        "FSDP_TRANSFORMER_CLS_TO_WRAP",
        _FSDP,
        "transformer_cls_names_to_wrap",
    ),
    LaunchVariable("fsdp_backward_prefetch", "FSDP_BACKWARD_PREFETCH", _FSDP, "backward_prefetch"),
    LaunchVariable("fsdp_state_dict_type", "FSDP_STATE_DICT_TYPE", _FSDP, "state_dict_type"),
    LaunchVariable("fsdp_forward_prefetch", "FSDP_FORWARD_PREFETCH", _FSDP, "forward_prefetch"),
    LaunchVariable("fsdp_use_orig_params", "FSDP_USE_ORIG_PARAMS", _FSDP, "use_orig_params"),
    LaunchVariable(
        "fsdp_cpu_ram_efficient_loading",
        "FSDP_CPU_RAM_EFFICIENT_LOADING",
        _FSDP,
        "cpu_ram_efficient_loading",
    ),
    LaunchVariable("fsdp_sync_module_states", "FSDP_SYNC_MODULE_STATES", _FSDP, "sync_module_states"),
    LaunchVariable(
        "fsdp_activation_checkpointing", "FSDP_ACTIVATION_CHECKPOINTING", _FSDP, "activation_checkpointing"
    ),
    LaunchVariable(
        "fsdp_activation_checkpointing_offload",
        "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD",
        _FSDP,
        "activation_checkpointing_offload",
    ),
    LaunchVariable("zero_stage", "ACCELERATE_DEEPSPEED_ZERO_STAGE", _DEEPSPEED, "zero_stage"),
    LaunchVariable("deepspeed_config_file", "ACCELERATE_DEEPSPEED_CONFIG_FILE", _DEEPSPEED, "hf_ds_config"),
    LaunchVariable(
        "offload_optimizer_device",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
        _DEEPSPEED,
        "offload_optimizer_device",
    ),
    LaunchVariable(
        "offload_param_device",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
        _DEEPSPEED,
        "offload_param_device",
    ),
    LaunchVariable("zero3_init_flag", "ACCELERATE_DEEPSPEED_ZERO3_INIT", _DEEPSPEED, "zero3_init_flag"),
    LaunchVariable(
        "zero3_save_16bit_model",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
        _DEEPSPEED,
        "zero3_save_16bit_model",
    ),
    LaunchVariable("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING", _DEEPSPEED, "gradient_clipping"),
    LaunchVariable(
        "deepspeed_moe_layer_cls_names",
        "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES",
        _DEEPSPEED,
        "transformer_moe_cls_names",
    ),
    *(
        LaunchVariable(f"parallelism_config_{field}", f"PARALLELISM_CONFIG_{field.upper()}", _PARALLEL, field)
        for field in (
            "dp_replicate_size",
            "dp_shard_size",
            "tp_size",
            "cp_size",
            "sp_size",
        )
    ),
    LaunchVariable(
        "parallelism_config_cp_comm_strategy",
        "PARALLELISM_CONFIG_CP_COMM_STRATEGY",
        "TorchContextParallelConfig",
        "cp_comm_strategy",
    ),
    *(
        LaunchVariable(f"parallelism_config_{field}", f"PARALLELISM_CONFIG_{field.upper()}", _SEQUENCE, field)
        for field in ("sp_seq_length", "sp_seq_length_is_variable", "sp_attn_implementation")
    ),
)


def launch_variables(reader: str) -> dict[str, str]:
    """Of :data:`LAUNCH_VARIABLES`, those ``reader`` (a class name) reads, by the field each fills."""
    return {entry.field: entry.variable for entry in LAUNCH_VARIABLES if entry.reader == reader}
