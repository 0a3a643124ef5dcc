"""Building an Accelerator on one process: arguments, ACCELERATE_* fallbacks, properties, refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from hasten import Accelerator, AcceleratorState, GradientState
from hasten.utils import (
    AutocastKwargs,
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    FP8RecipeKwargs,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    GradScalerKwargs,
    MegatronLMPlugin,
    ProfileKwargs,
    ProjectConfiguration,
    TorchDynamoPlugin,
    patch_environment,
)
from hasten.utils.errors import ConfigurationError


def test_defaults_describe_one_cpu_process() -> None:
    accelerator = Accelerator()
    assert accelerator.device == torch.device("cpu")
    assert accelerator.distributed_type == DistributedType.NO
    assert (accelerator.num_processes, accelerator.process_index, accelerator.local_process_index) == (
        1,
        0,
        0,
    )
    assert accelerator.is_main_process and accelerator.is_local_main_process and accelerator.is_last_process
    assert not accelerator.use_distributed and not accelerator.multi_device
    assert accelerator.mixed_precision == "no" and not accelerator.native_amp and accelerator.scaler is None
    assert accelerator.gradient_accumulation_steps == 1 and accelerator.sync_gradients
    assert accelerator.device_placement and accelerator.step_scheduler_with_optimizer
    assert accelerator.rng_types == ["generator"]
    assert accelerator.step == 0 and accelerator.optimizer_step_was_skipped is False
    assert not accelerator.is_fsdp2 and not accelerator.is_composable_parallelism_enabled
    assert accelerator.deepspeed_plugin is None and accelerator.parallelism_config is None
    assert accelerator.torch_device_mesh is None and accelerator.should_save_model
    assert accelerator.fp8_backend == "NO"
    assert (accelerator.split_batches, accelerator.dispatch_batches, accelerator.even_batches) == (
        False,
        None,
        True,
    )
    assert not (
        accelerator.use_seedable_sampler or accelerator.non_blocking or accelerator.use_stateful_dataloader
    )
    assert (
        accelerator.project_dir is None
        and accelerator.logging_dir is None
        and accelerator.save_iteration == 0
    )
    assert (accelerator._models, accelerator._optimizers, accelerator._schedulers) == ([], [], [])
    assert (accelerator._dataloaders, accelerator._custom_objects) == ([], [])
    assert isinstance(accelerator.state, AcceleratorState) and isinstance(
        accelerator.gradient_state, GradientState
    )
    assert copy.deepcopy(accelerator) is accelerator
    assert "single device" in repr(accelerator)


def test_environment_fallbacks() -> None:
    with patch_environment(
        ACCELERATE_MIXED_PRECISION="bf16",
        ACCELERATE_GRADIENT_ACCUMULATION_STEPS="3",
        ACCELERATE_DYNAMO_BACKEND="eager",
        ACCELERATE_FP8_BACKEND="TE",
    ):
        accelerator = Accelerator()
    assert accelerator.mixed_precision == "bf16" and accelerator.native_amp
    assert accelerator.gradient_accumulation_steps == 3
    assert accelerator.state.dynamo_plugin.backend == "EAGER"
    assert accelerator.fp8_backend == "TE"


def test_arguments_win_over_the_environment() -> None:
    with patch_environment(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="3", ACCELERATE_MIXED_PRECISION="bf16"):
        accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision="no")
    assert accelerator.gradient_accumulation_steps == 2 and accelerator.mixed_precision == "no"


def test_bad_accumulation_steps_from_the_environment_name_the_variable() -> None:
    with (
        patch_environment(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="zero"),
        pytest.raises(
            ConfigurationError, match="environment variable ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
        ),
    ):
        Accelerator()


@pytest.mark.parametrize("steps", [0, -2, 1.5, "four"])
def test_gradient_accumulation_steps_must_be_a_positive_int(steps: object) -> None:
    with pytest.raises(ConfigurationError, match="gradient_accumulation_steps"):
        Accelerator(gradient_accumulation_steps=steps)  # type: ignore[arg-type]


def test_gradient_accumulation_plugin_and_setter() -> None:
    plugin = GradientAccumulationPlugin(num_steps=4, sync_each_batch=True)
    accelerator = Accelerator(gradient_accumulation_plugin=plugin)
    assert accelerator.gradient_accumulation_steps == 4 and accelerator.gradient_state.sync_each_batch
    accelerator.gradient_accumulation_steps = 2
    assert accelerator.gradient_accumulation_steps == 2 and GradientState().num_steps == 2
    with pytest.raises(ConfigurationError, match="at least 1"):
        accelerator.gradient_accumulation_steps = 0
    accelerator.sync_gradients = False
    assert not accelerator.gradient_state.sync_gradients
    with pytest.raises(TypeError, match="sync_gradients"):
        accelerator.sync_gradients = "yes"  # type: ignore[assignment]


def test_accumulation_plugin_and_steps_exclude_each_other() -> None:
    with pytest.raises(ConfigurationError, match="pass only the plugin"):
        Accelerator(
            gradient_accumulation_steps=2,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=2),
        )
    with pytest.raises(TypeError, match="gradient_accumulation_plugin must be a GradientAccumulationPlugin"):
        Accelerator(gradient_accumulation_plugin={"num_steps": 2})


def test_configurations_and_project_dir(tmp_path: object) -> None:
    config = DataLoaderConfiguration(split_batches=True, even_batches=False, non_blocking=True)
    accelerator = Accelerator(dataloader_config=config, project_dir=str(tmp_path))
    assert accelerator.split_batches and not accelerator.even_batches and accelerator.non_blocking
    assert accelerator.project_dir == str(tmp_path) == accelerator.logging_dir
    accelerator.even_batches = True
    assert config.even_batches
    with pytest.raises(TypeError, match="even_batches"):
        accelerator.even_batches = 1  # type: ignore[assignment]
    AcceleratorState._reset_state(reset_partial_state=True)
    project = ProjectConfiguration(logging_dir="logs", iteration=3)
    accelerator = Accelerator(project_config=project, project_dir="runs")
    assert (accelerator.project_dir, accelerator.logging_dir, accelerator.save_iteration) == (
        "runs",
        "logs",
        3,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"dataloader_config": {"split_batches": True}},
            "dataloader_config must be a DataLoaderConfiguration",
        ),
        ({"project_config": "runs"}, "project_config must be a ProjectConfiguration"),
        ({"device_placement": "yes"}, "device_placement='yes' must be True or False"),
        ({"step_scheduler_with_optimizer": 1}, "step_scheduler_with_optimizer=1 must be True or False"),
        ({"cpu": "yes"}, "cpu='yes' must be True or False"),
        ({"rng_types": "generator"}, "rng_types='generator' must be a list"),
        ({"kwargs_handlers": DistributedDataParallelKwargs()}, "must be a list of kwargs handlers"),
        ({"kwargs_handlers": [object()]}, r"kwargs_handlers\[0\] is a object; the Accelerator uses"),
        ({"dynamo_plugin": "inductor"}, "dynamo_plugin must be a TorchDynamoPlugin"),
        ({"fsdp_plugin": {"fsdp_version": 2}}, "fsdp_plugin must be a FullyShardedDataParallelPlugin"),
        ({"megatron_lm_plugin": object()}, "megatron_lm_plugin must be a MegatronLMPlugin"),
        ({"deepspeed_plugins": {"a": object()}}, r"deepspeed_plugins\['a'\] must be a DeepSpeedPlugin"),
    ],
)
def test_wrong_types_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        Accelerator(**kwargs)  # type: ignore[arg-type]


def test_bad_values_are_named() -> None:
    with pytest.raises(ConfigurationError, match="mixed_precision='fp32' is not valid"):
        Accelerator(mixed_precision="fp32")
    with pytest.raises(ConfigurationError, match=r"rng_types\[1\]='dice' is not valid"):
        Accelerator(rng_types=["torch", "dice"])
    with pytest.raises(ConfigurationError, match="both passed"):
        Accelerator(dynamo_backend="eager", dynamo_plugin=TorchDynamoPlugin(backend="eager"))
    with pytest.raises(ConfigurationError, match="two DistributedDataParallelKwargs"):
        Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(), DistributedDataParallelKwargs(dim=1)])
    with pytest.raises(ConfigurationError, match="no longer takes it"):
        Accelerator(split_batches=True)


def test_kwargs_handlers_land_on_their_attributes() -> None:
    handlers = [
        DistributedDataParallelKwargs(find_unused_parameters=True),
        AutocastKwargs(cache_enabled=False),
        GradScalerKwargs(init_scale=1024.0),
        ProfileKwargs(record_shapes=True),
    ]
    accelerator = Accelerator(kwargs_handlers=handlers, rng_types=["torch", "generator"])
    assert accelerator.ddp_handler is handlers[0] and accelerator.autocast_handler is handlers[1]
    assert accelerator.scaler_handler is handlers[2] and accelerator.profile_handler is handlers[3]
    assert accelerator.init_handler is None and accelerator.fp8_recipe_handler is None
    assert accelerator.rng_types == ["torch", "generator"]


def test_fp16_on_cpu_refuses_like_accelerate() -> None:
    with pytest.raises(ConfigurationError, match=r"mixed_precision='fp16' needs one of the devices .* 'cpu'"):
        Accelerator(mixed_precision="fp16")


def test_fp8_refuses() -> None:
    with pytest.raises(ConfigurationError, match="mixed_precision='fp8' needs TransformerEngine"):
        Accelerator(mixed_precision="fp8")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ConfigurationError, match="FP8RecipeKwargs"):
        Accelerator(kwargs_handlers=[FP8RecipeKwargs(backend="TE")])


@pytest.mark.parametrize(
    ("kwargs", "environment", "message"),
    [
        (
            {"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2)},
            {},
            "FSDP2 engine needs a process group",
        ),
        ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP2 engine needs a process group"),
        ({"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=1)}, {}, "hasten runs FSDP2"),
        ({}, {"ACCELERATE_USE_FSDP": "true"}, "fsdp_version=1 .* `hasten to-fsdp2`"),
        ({"deepspeed_plugin": DeepSpeedPlugin(zero_stage=2)}, {}, "DeepSpeed engine needs a process group"),
        ({}, {"ACCELERATE_USE_DEEPSPEED": "1"}, "DeepSpeed engine needs a process group"),
        (
            {
                "deepspeed_plugin": DeepSpeedPlugin(),
                "fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2),
            },
            {},
            "one engine runs at a time",
        ),
        ({"deepspeed_plugins": {}}, {}, "holds no plugin"),
        ({"megatron_lm_plugin": MegatronLMPlugin()}, {}, "does not run Megatron-LM"),
        ({}, {"ACCELERATE_USE_MEGATRON_LM": "true"}, "does not run Megatron-LM"),
        ({"parallelism_config": object()}, {}, "n-D parallelism"),
        ({"torch_tp_plugin": object()}, {}, "n-D parallelism"),
        ({}, {"ACCELERATE_USE_PARALLELISM_CONFIG": "true"}, "n-D parallelism"),
    ],
)
def test_engines_not_run_here_are_refused_before_the_state_forms(
    kwargs: dict[str, object], environment: dict[str, str], message: str
) -> None:
    with patch_environment(**environment), pytest.raises(ConfigurationError, match=message):
        Accelerator(**kwargs)  # type: ignore[arg-type]
    assert not AcceleratorState().initialized or AcceleratorState().distributed_type == DistributedType.NO


def test_deepspeed_plugin_and_plugins_exclude_each_other() -> None:
    plugin = DeepSpeedPlugin(zero_stage=2)
    with pytest.raises(ConfigurationError, match="deepspeed_plugin and deepspeed_plugins"):
        Accelerator(deepspeed_plugin=plugin, deepspeed_plugins={"a": plugin})


def test_a_state_made_for_an_engine_without_one_is_refused() -> None:
    AcceleratorState(megatron_lm_plugin=MegatronLMPlugin())
    with pytest.raises(ConfigurationError, match="runs MEGATRON_LM, which hasten has no engine for"):
        Accelerator()


def test_a_state_made_for_fsdp_on_one_process_is_refused() -> None:
    AcceleratorState(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    with pytest.raises(ConfigurationError, match="FSDP2 engine needs a process group"):
        Accelerator()


def test_second_accelerator_shares_the_state_and_refuses_changes() -> None:
    first = Accelerator(mixed_precision="bf16", dynamo_backend="eager")
    second = Accelerator()
    assert second.state.mixed_precision == "bf16" and second.mixed_precision == "bf16"
    assert second._settings.compiles and first.state.dynamo_plugin is second.state.dynamo_plugin
    with pytest.raises(ValueError, match="mixed_precision"):  # ConfigurationError once harden-args lands
        Accelerator(mixed_precision="no")
    with pytest.raises(ConfigurationError, match="dynamo"):
        Accelerator(dynamo_backend="aot_eager")


def test_parallel_ranks_are_not_configured() -> None:
    accelerator = Accelerator()
    for name in (
        "tensor_parallel_rank",
        "pipeline_parallel_rank",
        "context_parallel_rank",
        "data_parallel_rank",
        "data_parallel_shard_rank",
    ):
        with pytest.raises(RuntimeError, match="parallelism is not configured"):
            getattr(accelerator, name)
    with accelerator.maybe_context_parallel():
        pass
