"""FullyShardedDataParallelPlugin on one process: FSDP_* environment, precedence, conversion to torch objects,
validation, and the wrap policy resolved against a real model. Sharding itself runs in tests/dist."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import (
    BackwardPrefetch,
    CPUOffload,
    CPUOffloadPolicy,
    FullStateDictConfig,
    MixedPrecision,
    MixedPrecisionPolicy,
    OffloadPolicy,
    ShardedStateDictConfig,
    ShardingStrategy,
    StateDictType,
)
from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

from hasten.utils.dataclasses import FullyShardedDataParallelPlugin, get_module_class_from_name
from hasten.utils.dataclasses.plugins.fsdp_wrap import (
    _ignored_modules,
    bind_auto_wrap_policy,
    modules_selected,
)
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


class Block(torch.nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class Model(torch.nn.Module):
    _no_split_modules = ("Block",)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_fsdp1_defaults() -> None:
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy is ShardingStrategy.FULL_SHARD
    assert plugin.backward_prefetch is None and plugin.auto_wrap_policy is None
    assert plugin.cpu_offload == CPUOffload(offload_params=False)
    assert plugin.state_dict_type is StateDictType.FULL_STATE_DICT
    assert isinstance(plugin.state_dict_config, FullStateDictConfig) and plugin.state_dict_config.rank0_only
    assert (plugin.use_orig_params, plugin.sync_module_states, plugin.forward_prefetch) == (
        False,
        False,
        False,
    )


def test_fsdp2_defaults() -> None:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert plugin.reshard_after_forward is True
    assert isinstance(plugin.cpu_offload, OffloadPolicy) and not isinstance(
        plugin.cpu_offload, CPUOffloadPolicy
    )
    assert plugin.state_dict_type is StateDictType.SHARDED_STATE_DICT
    assert isinstance(plugin.state_dict_config, ShardedStateDictConfig)
    assert plugin.use_orig_params is None and plugin.backward_prefetch is None


def test_environment_of_the_launcher() -> None:
    with patch_environment(
        FSDP_SHARDING_STRATEGY="SHARD_GRAD_OP",
        FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
        FSDP_TRANSFORMER_CLS_TO_WRAP="Block,Linear",
        FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT",
        FSDP_OFFLOAD_PARAMS="true",
        FSDP_BACKWARD_PREFETCH="BACKWARD_PRE",
        FSDP_USE_ORIG_PARAMS="true",
        FSDP_ACTIVATION_CHECKPOINTING="1",
    ):
        plugin = FullyShardedDataParallelPlugin()
        explicit = FullyShardedDataParallelPlugin(sharding_strategy="NO_SHARD", cpu_offload=False)
    assert plugin.sharding_strategy is ShardingStrategy.SHARD_GRAD_OP
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["Block", "Linear"]
    assert plugin.state_dict_type is StateDictType.SHARDED_STATE_DICT
    assert plugin.cpu_offload == CPUOffload(offload_params=True)
    assert plugin.backward_prefetch is BackwardPrefetch.BACKWARD_PRE
    assert plugin.use_orig_params is True and plugin.activation_checkpointing is True
    assert explicit.sharding_strategy is ShardingStrategy.NO_SHARD and explicit.cpu_offload == CPUOffload(
        False
    )


def test_fsdp2_environment() -> None:
    with patch_environment(FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="false", FSDP_OFFLOAD_PARAMS="1"):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy)


def test_sharding_strategy_spellings() -> None:
    assert (
        FullyShardedDataParallelPlugin(sharding_strategy="shard_grad_op").sharding_strategy
        is ShardingStrategy.SHARD_GRAD_OP
    )
    assert FullyShardedDataParallelPlugin(sharding_strategy=3).sharding_strategy is ShardingStrategy.NO_SHARD
    assert FullyShardedDataParallelPlugin(sharding_strategy="HYBRID_SHARD_ZERO2").sharding_strategy is (
        ShardingStrategy._HYBRID_SHARD_ZERO2
    )
    assert (
        FullyShardedDataParallelPlugin(reshard_after_forward="NO_SHARD").sharding_strategy
        is ShardingStrategy.NO_SHARD
    )
    assert (
        FullyShardedDataParallelPlugin(
            fsdp_version=2, sharding_strategy="SHARD_GRAD_OP"
        ).reshard_after_forward
        is False
    )


def test_size_based_policy_and_min_params_from_the_environment() -> None:
    with patch_environment(FSDP_AUTO_WRAP_POLICY="size_based_wrap", FSDP_MIN_NUM_PARAMS="50"):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.auto_wrap_policy is size_based_auto_wrap_policy and plugin.min_num_params == 50


def test_mixed_precision_policies() -> None:
    fsdp1 = FullyShardedDataParallelPlugin(mixed_precision_policy="bf16")
    assert fsdp1.mixed_precision_policy == MixedPrecision(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    fsdp2 = FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy="fp16")
    assert fsdp2.mixed_precision_policy == MixedPrecisionPolicy(
        param_dtype=torch.float16, reduce_dtype=torch.float16, output_dtype=torch.float16
    )
    as_dict = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32, "output_dtype": torch.bfloat16}
    assert FullyShardedDataParallelPlugin(
        fsdp_version=2, mixed_precision_policy=as_dict
    ).mixed_precision_policy == (MixedPrecisionPolicy(**as_dict))
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision(torch.float16, buffer_autocast=True)
    assert plugin.mixed_precision_policy == MixedPrecision(torch.float16, torch.float16, torch.float32)
    with pytest.raises(ConfigurationError, match=r"mixed_precision=torch.int8 is not valid; expected one of"):
        plugin.set_mixed_precision(torch.int8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"sharding_strategy": "FULL"},
            r"sharding_strategy='FULL' is not valid; expected one of \['FULL_SHARD', 'SHARD_GRAD_OP'",
        ),
        ({"fsdp_version": 3}, "fsdp_version=3 is not an FSDP version; expected 1 or 2"),
        (
            {"auto_wrap_policy": "by_layer"},
            r"auto_wrap_policy='by_layer' is not valid; expected one of \['TRANSFORMER_BASED_WRAP'",
        ),
        (
            {"state_dict_type": "FULL"},
            r"state_dict_type='FULL' is not valid; expected one of \['FULL_STATE_DICT'",
        ),
        (
            {"fsdp_version": 2, "state_dict_type": "LOCAL_STATE_DICT"},
            "LOCAL_STATE_DICT does not exist in FSDP2",
        ),
        (
            {"backward_prefetch": "EARLY"},
            r"backward_prefetch='EARLY' is not valid; expected one of \['BACKWARD_PRE', 'BACKWARD_POST'\]",
        ),
        (
            {"fsdp_version": 2, "backward_prefetch": "BACKWARD_PRE"},
            "backward_prefetch='BACKWARD_PRE' is an FSDP1 option",
        ),
        (
            {"fsdp_version": 2, "sharding_strategy": "HYBRID_SHARD"},
            "sharding_strategy='HYBRID_SHARD' has no FSDP2 equivalent",
        ),
        ({"fsdp_version": 2, "forward_prefetch": True}, "forward_prefetch=True is an FSDP1 option"),
        ({"fsdp_version": 2, "use_orig_params": False}, "use_orig_params=False is impossible with FSDP2"),
        (
            {"fsdp_version": 2, "reshard_after_forward": "often"},
            "reshard_after_forward='often' is not a boolean",
        ),
        (
            {"sharding_strategy": "FULL_SHARD", "reshard_after_forward": "NO_SHARD"},
            "contradicts sharding_strategy='FULL_SHARD'",
        ),
        ({"cpu_offload": "maybe"}, "cpu_offload='maybe' is not a boolean"),
        (
            {"cpu_offload": CPUOffloadPolicy()},
            "cpu_offload=.* must be a bool or a torch.distributed.fsdp.CPUOffload with fsdp_version=1",
        ),
        (
            {"mixed_precision_policy": "fp64"},
            r"mixed_precision_policy='fp64' is not valid; expected one of \['fp8', 'fp16', 'bf16', 'fp32'\]",
        ),
        ({"mixed_precision_policy": {"param_dtype": torch.float16}}, "needs exactly the keys"),
        (
            {"mixed_precision_policy": MixedPrecisionPolicy()},
            "must be a torch.distributed.fsdp.MixedPrecision with fsdp_version=1",
        ),
        (
            {"mixed_precision_policy": 16},
            "mixed_precision_policy=16 must be a torch.distributed.fsdp.MixedPrecision",
        ),
        (
            {"activation_checkpointing_offload": True},
            "activation_checkpointing_offload=True needs activation_checkpointing=True",
        ),
        (
            {"activation_checkpointing": True, "activation_checkpointing_offload": True},
            "needs fsdp_version=2",
        ),
        (
            {"ignored_modules": "blocks.(["},
            r"ignored_modules='blocks.\(\[' is not a valid regular expression",
        ),
        (
            {"auto_wrap_policy": "size_based_wrap", "min_num_params": -1},
            "min_num_params=-1 must be at least 0",
        ),
        (
            {"auto_wrap_policy": "transformer_based_wrap", "transformer_cls_names_to_wrap": 5},
            "must be a list of names",
        ),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        FullyShardedDataParallelPlugin(**kwargs)  # type: ignore[arg-type]


def test_bad_environment_value_names_the_variable() -> None:
    with (
        patch_environment(FSDP_SHARDING_STRATEGY="FULL"),
        pytest.raises(
            ConfigurationError, match="environment variable FSDP_SHARDING_STRATEGY='FULL' is not valid"
        ),
    ):
        FullyShardedDataParallelPlugin()
    with (
        patch_environment(FSDP_AUTO_WRAP_POLICY="layers"),
        pytest.raises(
            ConfigurationError, match="environment variable FSDP_AUTO_WRAP_POLICY='layers' is not valid"
        ),
    ):
        FullyShardedDataParallelPlugin()


def test_transformer_policy_is_resolved_against_the_model() -> None:
    model = Model()
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap")
    policy = bind_auto_wrap_policy(plugin, model)  # names from model._no_split_modules
    assert plugin.transformer_cls_names_to_wrap == ["Block"]
    assert modules_selected(model, policy) == list(model.blocks)
    assert (
        get_module_class_from_name(model, "Block") is Block
        and get_module_class_from_name(model, "GPT") is None
    )


def test_unknown_transformer_class_lists_the_model_classes() -> None:
    plugin = FullyShardedDataParallelPlugin(
        auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["block"]
    )
    with pytest.raises(ConfigurationError) as error:
        plugin.set_auto_wrap_policy(Model())
    assert "transformer_cls_names_to_wrap has 'block', but the model has no module of that class" in str(
        error.value
    )
    assert "['Block', 'Linear', 'Model', 'ModuleList']" in str(error.value)


def test_size_policy_counts_parameters_bottom_up() -> None:
    model = Model()  # each Block has 72 parameters, the head 18
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="size_based_wrap", min_num_params=70)
    selected = modules_selected(model, bind_auto_wrap_policy(plugin, model))
    assert selected == [
        block.linear for block in model.blocks
    ]  # innermost first; the blocks hold nothing else
    assert (
        bind_auto_wrap_policy(FullyShardedDataParallelPlugin(auto_wrap_policy="size_based_wrap"), model)
        is None
    )


def test_wrap_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="FSDP needs a process group; create PartialState"):
        FullyShardedDataParallelPlugin(fsdp_version=2).wrap(Model())


def test_ignored_modules_by_regex_from_the_environment() -> None:
    model = Model()
    with patch_environment(FSDP_IGNORED_MODULES=r"blocks\.[02]"):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert _ignored_modules(plugin, model) == [model.blocks[0], model.blocks[2]]
    assert _ignored_modules(FullyShardedDataParallelPlugin(ignored_modules=[model.head]), model) == [
        model.head
    ]


def test_state_dict_options_follow_the_state_dict_type() -> None:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert not plugin.state_dict_options().full_state_dict
    plugin.set_state_dict_type("FULL_STATE_DICT")
    assert plugin.state_dict_options().full_state_dict and plugin.state_dict_options().cpu_offload
