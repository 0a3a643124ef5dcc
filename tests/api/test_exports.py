"""The public surface: API.md's names are exported, `__all__` is exact and sorted, and
(with Accelerate installed) every name shared with Accelerate has the same parameters and defaults."""

from __future__ import annotations

import enum
import importlib
import inspect
import types

import pytest

# Names API.md promises from `hasten.utils`.
API_UTILS = {
    # constants
    "MODEL_NAME",
    "OPTIMIZER_NAME",
    "RNG_STATE_NAME",
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "WEIGHTS_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    # enums
    "ComputeEnvironment",
    "DistributedType",
    "DynamoBackend",
    "LoggerType",
    "PrecisionType",
    "RNGType",
    "SageMakerDistributedType",
    "DDPCommunicationHookType",
    "FP8BackendType",
    "CustomDtype",
    # kwargs handlers, plugins, configurations
    "KwargsHandler",
    "AutocastKwargs",
    "DistributedDataParallelKwargs",
    "FP8RecipeKwargs",
    "GradScalerKwargs",
    "InitProcessGroupKwargs",
    "ProfileKwargs",
    "DeepSpeedPlugin",
    "FullyShardedDataParallelPlugin",
    "GradientAccumulationPlugin",
    "MegatronLMPlugin",
    "TorchDynamoPlugin",
    "BnbQuantizationConfig",
    "DataLoaderConfiguration",
    "ProjectConfiguration",
    # data operations
    "broadcast",
    "broadcast_object_list",
    "concatenate",
    "convert_outputs_to_fp32",
    "convert_to_fp32",
    "gather",
    "gather_object",
    "listify",
    "pad_across_processes",
    "recursively_apply",
    "reduce",
    "send_to_device",
    "slice_tensors",
    "pad_input_tensors",
    "find_batch_size",
    "find_device",
    "is_namedtuple",
    "honor_type",
    "get_grad_scaler",
    "get_mixed_precision_context_manager",
    # environment checks and manipulation
    "is_bf16_available",
    "is_ipex_available",
    "is_mps_available",
    "is_npu_available",
    "is_torch_version",
    "is_torch_xla_available",
    "is_xpu_available",
    "patch_environment",
    "clear_environment",
    "write_basic_config",
    "set_numa_affinity",
    "purge_accelerate_environment",
    # memory
    "find_executable_batch_size",
    "release_memory",
    "clear_device_cache",
    # model handling
    "calculate_maximum_sizes",
    "compute_module_sizes",
    "extract_model_from_parallel",
    "get_balanced_memory",
    "get_max_layer_size",
    "infer_auto_device_map",
    "load_checkpoint_in_model",
    "load_offloaded_weights",
    "load_state_dict",
    "offload_state_dict",
    "retie_parameters",
    "find_tied_parameters",
    "set_module_tensor_to_device",
    "shard_checkpoint",
    "get_module_children_bottom_up",
    "OffloadedWeightsLoader",
    "PrefixedDataset",
    # parallel, random, XLA, quantization
    "save",
    "load",
    "wait_for_everyone",
    "set_seed",
    "synchronize_rng_state",
    "synchronize_rng_states",
    "install_xla",
    "load_and_quantize_model",
    # DeepSpeed (hasten.utils.deepspeed)
    "DeepSpeedEngineWrapper",
    "DeepSpeedOptimizerWrapper",
    "DeepSpeedSchedulerWrapper",
    "DummyOptim",
    "DummyScheduler",
    "get_active_deepspeed_plugin",
    "map_pytorch_optim_to_deepspeed",
}

# Names API.md promises from `hasten`.
API_TOP = {
    "PartialState",
    "AcceleratorState",
    "GradientState",
    "init_empty_weights",
    "init_on_device",
    "dispatch_model",
    "cpu_offload",
    "cpu_offload_with_hook",
    "disk_offload",
    "load_checkpoint_and_dispatch",
    "find_executable_batch_size",
    "infer_auto_device_map",
    "load_checkpoint_in_model",
    "synchronize_rng_states",
    "AutocastKwargs",
    "DistributedDataParallelKwargs",
    "FP8RecipeKwargs",
    "GradScalerKwargs",
    "InitProcessGroupKwargs",
    "ProfileKwargs",
    "DeepSpeedPlugin",
    "FullyShardedDataParallelPlugin",
    "GradientAccumulationPlugin",
    "MegatronLMPlugin",
    "TorchDynamoPlugin",
    "skip_first_batches",
    "debug_launcher",
    "notebook_launcher",
    "Accelerator",
}

# Names not built yet, by the issue that builds them. Remove a name when it lands: the test fails
# both when a name outside this set is missing and when a name inside it already exists.
PENDING: dict[str, set[str]] = {}
_PENDING = set().union(*PENDING.values())

# Where hasten's signature differs from Accelerate's on purpose: name -> the reason.
SIGNATURE_DIFFERENCES: dict[str, str] = {
    "write_basic_config": "save_location=None means the default file, found when called (honours HF_HOME set "
    "later); Accelerate bakes the path in at import time",
    "find_tied_parameters": (
        "no **kwargs: Accelerate's were for its own recursion and are documented as to be ignored"
    ),
}

# Where Accelerate keeps names it does not re-export from the facade hasten mirrors.
ACCELERATE_HOMES = [
    "accelerate.state",
    "accelerate.utils.dataclasses",
    "accelerate.utils.memory",
    "accelerate.utils.modeling",
    "accelerate.utils.operations",
    "accelerate.utils.environment",
    "accelerate.utils.offload",
    "accelerate.utils.random",
    "accelerate.big_modeling",
    "accelerate.hooks",
    "accelerate.launchers",
]
NOT_IN_ACCELERATE = {
    "is_ipex_available": "Accelerate 1.x dropped it; API.md keeps it",
    "shard_checkpoint": "Accelerate 1.x dropped it for huggingface_hub's splitter; API.md keeps it",
}


def _public_names(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }


@pytest.mark.parametrize("facade", ["hasten", "hasten.utils", "hasten.utils.dataclasses"])
def test_all_is_sorted_and_equals_the_public_names(facade: str) -> None:
    module = importlib.import_module(facade)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{facade}.__all__ is not sorted"
    assert len(exported) == len(set(exported)), f"{facade}.__all__ has duplicates"
    public = _public_names(module) - {"__version__"}
    assert set(exported) == public, (
        f"{facade}: in __all__ only {sorted(set(exported) - public)}; public but not in __all__ "
        f"{sorted(public - set(exported))}"
    )


@pytest.mark.parametrize(("facade", "names"), [("hasten.utils", API_UTILS), ("hasten", API_TOP)])
def test_api_md_names_are_exported(facade: str, names: set[str]) -> None:
    module = importlib.import_module(facade)
    missing = sorted(name for name in names - _PENDING if not hasattr(module, name))
    assert not missing, f"{facade} lacks names API.md promises: {missing}"
    landed = sorted(name for name in names & _PENDING if hasattr(module, name))
    assert not landed, f"{facade} now exports {landed}: remove them from PENDING in this test"


def test_environment_module_offers_override_numa_affinity() -> None:
    from hasten.utils import environment

    assert callable(environment.override_numa_affinity)


def _comparable(parameter: inspect.Parameter) -> tuple[str, object, object]:
    default = parameter.default
    if callable(default) and hasattr(default, "__name__"):
        default = default.__name__
    elif isinstance(default, enum.Enum):  # enums compare by value (Accelerate's are not all str enums)
        default = default.value
    elif type(default) is object:  # a private "not passed" sentinel (Accelerator's split_batches)
        default = "<sentinel>"
    return parameter.name, parameter.kind, default


def _accelerate_pairs() -> list[tuple[str, str]]:
    return [("hasten.utils", name) for name in sorted(API_UTILS)] + [
        ("hasten", name) for name in sorted(API_TOP)
    ]


@pytest.mark.parametrize(("facade", "name"), _accelerate_pairs())
def test_shared_names_match_accelerate(facade: str, name: str) -> None:
    accelerate = pytest.importorskip(facade.replace("hasten", "accelerate", 1))
    if name in _PENDING:
        pytest.skip(f"{name} is not built yet")
    if name in NOT_IN_ACCELERATE:
        pytest.skip(NOT_IN_ACCELERATE[name])
    ours = getattr(importlib.import_module(facade), name)
    homes = [accelerate] + [importlib.import_module(home) for home in ACCELERATE_HOMES]
    theirs = next((getattr(home, name) for home in homes if hasattr(home, name)), None)
    assert theirs is not None, f"API.md lists {name!r} but accelerate has no such name"
    if (
        name in SIGNATURE_DIFFERENCES
        or not callable(theirs)
        or (isinstance(theirs, type) and issubclass(theirs, str))
    ):
        return
    try:
        their_signature = inspect.signature(theirs)
    except (TypeError, ValueError):
        return
    our_params = [_comparable(p) for p in inspect.signature(ours).parameters.values()]
    their_params = [_comparable(p) for p in their_signature.parameters.values()]
    # hasten may add trailing keyword parameters; it keeps every one of Accelerate's, in order.
    assert our_params[: len(their_params)] == their_params, (
        f"{facade}.{name}: hasten {our_params} vs accelerate {their_params}"
    )


# Training modules at Accelerate's paths: `from accelerate.X import Y` becomes `from hasten.X import Y`.
TRAINING_MODULES = {
    "hasten.accelerator": ["Accelerator"],
    "hasten.optimizer": ["AcceleratedOptimizer"],
    "hasten.scheduler": ["AcceleratedScheduler"],
    "hasten.local_sgd": ["LocalSGD"],
    "hasten.utils.deepspeed": [
        "DeepSpeedEngineWrapper",
        "DeepSpeedOptimizerWrapper",
        "DeepSpeedSchedulerWrapper",
        "DummyOptim",
        "DummyScheduler",
        "HfDeepSpeedConfig",
        "get_active_deepspeed_plugin",
        "map_pytorch_optim_to_deepspeed",
    ],
}


@pytest.mark.parametrize(("module", "names"), sorted(TRAINING_MODULES.items()))
def test_training_modules_match_accelerate(module: str, names: list[str]) -> None:
    ours = importlib.import_module(module)
    theirs = pytest.importorskip(module.replace("hasten", "accelerate", 1))
    for name in names:
        cls = getattr(ours, name)
        their_cls = getattr(theirs, name)
        our_params = [_comparable(p) for p in inspect.signature(cls).parameters.values()]
        their_params = [_comparable(p) for p in inspect.signature(their_cls).parameters.values()]
        assert our_params[: len(their_params)] == their_params, f"{module}.{name}"
        public = {n for n in dir(their_cls) if not n.startswith("_")}
        missing = sorted(n for n in public - set(dir(cls)) if n not in LATER_MEMBERS)
        assert not missing, f"{module}.{name} lacks Accelerate's members {missing}"


# Accelerator members hasten leaves out.
LATER_MEMBERS = {
    "deepspeed_ulysses_dl_adapter": "DeepSpeed's sequence parallelism needs parallelism_config, which hasten "
    "refuses (docs/design.md)",
    "lomo_backward": "LOMO optimizers are not supported (docs/design.md)",
    "print_lr": "gone from torch's schedulers since 2.x; nothing to delegate to",
}
