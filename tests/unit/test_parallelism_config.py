"""ParallelismConfig and the tensor / context / sequence parallel configs on one process: sizes from
arguments or the launcher's PARALLELISM_CONFIG_* variables, derived dimensions, and every refusal.
The device mesh itself is built on real ranks in tests/dist/test_parallelism_config.py."""

from __future__ import annotations

import re

import pytest
import torch

from hasten.parallelism_config import ParallelismConfig
from hasten.state import AcceleratorState
from hasten.utils.dataclasses.plugins import parallelism
from hasten.utils.dataclasses.plugins.parallelism import (
    TorchContextParallelConfig,
    TorchTensorParallelConfig,
    TorchTensorParallelPlugin,
)
from hasten.utils.dataclasses.plugins.sequence_parallel import DeepSpeedSequenceParallelConfig
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


def test_defaults_are_one_process_of_everything() -> None:
    config = ParallelismConfig()
    assert (
        config.dp_replicate_size,
        config.dp_shard_size,
        config.tp_size,
        config.cp_size,
        config.sp_size,
    ) == (
        1,
        1,
        1,
        1,
        1,
    )
    assert config.cp_backend == "torch" and config.sp_backend == "deepspeed"
    assert config.total_size == 1 and config.active_mesh_dims == [] and config._get_mesh() == ()
    assert config.tp_handler is None and config.cp_handler is None and config.sp_handler is None
    assert config.build_device_mesh("cpu") is None  # nothing to build on one process


def test_dimensions_of_hsdp_with_tensor_and_context_parallelism() -> None:
    config = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2, tp_size=2, cp_size=2)
    assert config.total_size == 16 and config.data_parallel_size == 4 and config.non_data_parallel_size == 4
    assert config.dp_dim_names == ["dp_replicate", "dp_shard"]
    assert config.non_dp_dim_names == ["tp", "cp"]
    assert config.dp_shard_cp_dim_names == ["dp_shard", "cp"]
    assert config.dp_cp_dim_names == ["dp_replicate", "dp_shard", "cp"]
    assert config.fsdp_dim_names == ["dp_replicate", "dp_shard_cp"]
    assert config._get_mesh() == (("dp_replicate", "dp_shard", "cp", "tp"), (2, 2, 2, 2))  # canonical order
    assert isinstance(config.tp_handler, TorchTensorParallelConfig)
    assert isinstance(config.cp_handler, TorchContextParallelConfig)
    assert config.cp_handler.cp_comm_strategy == "allgather"
    assert ParallelismConfig(dp_shard_size=4).fsdp_dim_names == ["dp_shard_cp"]
    assert "total_size=16" in repr(config)
    assert config.to_json()["cp_handler"] == {"cp_comm_strategy": "allgather"}
    assert config.to_json()["tp_size"] == 2 and "_joint_meshes" not in config.to_json()


def test_sizes_come_from_the_launchers_variables_and_arguments_win() -> None:
    with patch_environment(
        PARALLELISM_CONFIG_DP_SHARD_SIZE="2",
        PARALLELISM_CONFIG_TP_SIZE="2",
        PARALLELISM_CONFIG_CP_COMM_STRATEGY="alltoall",
        PARALLELISM_CONFIG_SP_SIZE="",
    ):
        config = ParallelismConfig(tp_size=1, cp_size=2)
        assert (config.dp_shard_size, config.tp_size, config.cp_size, config.sp_size) == (2, 1, 2, 1)
        assert config.cp_handler is not None and config.cp_handler.cp_comm_strategy == "alltoall"


@pytest.mark.parametrize(
    ("kwargs", "env", "message"),
    [
        ({"tp_size": 0}, {}, "tp_size=0 must be at least 1"),
        (
            {},
            {"PARALLELISM_CONFIG_DP_SHARD_SIZE": "two"},
            "environment variable PARALLELISM_CONFIG_DP_SHARD_SIZE='two'",
        ),
        ({"cp_backend": "ring"}, {}, r"cp_backend='ring' is not valid; expected one of \['torch'\]"),
        ({"sp_backend": "torch"}, {}, r"sp_backend='torch' is not valid; expected one of \['deepspeed'\]"),
        ({"cp_size": 2, "sp_size": 2}, {}, "cannot be combined; set one of them to 1"),
        ({"tp_size": 2, "dp_replicate_size": 2}, {}, "composes with FSDP, not with pure replication"),
        (
            {"tp_size": 2, "tp_handler": TorchContextParallelConfig()},
            {},
            "tp_handler=.* must be a TorchTensorParallelConfig",
        ),
    ],
)
def test_bad_layouts_are_refused(kwargs: dict, env: dict, message: str) -> None:
    with patch_environment(**env), pytest.raises(ConfigurationError, match=message):
        ParallelismConfig(**kwargs)


def test_mesh_needs_a_device_type_and_a_group_of_the_right_size() -> None:
    config = ParallelismConfig(dp_shard_size=2)
    with pytest.raises(ValueError, match="needs device_type"):
        config.get_device_mesh()
    with pytest.raises(ConfigurationError, match="needs a process group of 2 ranks"):
        config.get_device_mesh("cpu")
    with pytest.raises(ValueError, match="is not a dimension"):
        config._set_size("pp", 2)
    deepspeed_sequence = ParallelismConfig(sp_size=2)
    assert deepspeed_sequence.build_device_mesh("cpu") is None  # DeepSpeed forms its own groups
    assert isinstance(deepspeed_sequence.sp_handler, DeepSpeedSequenceParallelConfig)


def test_one_process_layout_against_the_state() -> None:
    state = AcceleratorState()
    ParallelismConfig()._validate_accelerator(state)  # nothing to check on one process
    with pytest.raises(ConfigurationError, match=r"total_size \(2\) does not match num_processes \(1\)"):
        ParallelismConfig(dp_shard_size=2)._validate_accelerator(state)


def test_tensor_parallel_plugin_and_config() -> None:
    assert TorchTensorParallelPlugin().tp_size == 1 and TorchTensorParallelPlugin().torch_device_mesh is None
    with pytest.raises(ConfigurationError, match="tp_size=0 must be at least 1"):
        TorchTensorParallelPlugin(tp_size=0)
    with pytest.raises(ConfigurationError, match=r"is not a torch\.distributed\.DeviceMesh"):
        TorchTensorParallelPlugin(tp_size=2, torch_device_mesh="mesh")
    assert TorchTensorParallelConfig().enable_async_tp is False
    with pytest.warns(UserWarning, match="asynchronous tensor parallelism is not supported; it is ignored"):
        TorchTensorParallelConfig(enable_async_tp=True)


def test_context_parallel_config_checks_its_strategy() -> None:
    assert TorchContextParallelConfig("alltoall").cp_comm_strategy == "alltoall"
    with pytest.raises(ConfigurationError, match=r"cp_comm_strategy='ring' is not valid; expected one of"):
        TorchContextParallelConfig("ring")


def test_configs_refuse_a_torch_without_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallelism, "is_torch_version", lambda operation, version: False)
    with pytest.raises(
        ConfigurationError,
        match=rf"Context parallelism needs torch >= 2.6.0; this is torch {re.escape(torch.__version__)}",
    ):
        TorchContextParallelConfig()
    with pytest.raises(ConfigurationError, match=r"Tensor parallelism needs torch >= 2\.3\.0"):
        TorchTensorParallelConfig()


def test_sequence_parallel_config() -> None:
    config = DeepSpeedSequenceParallelConfig()
    assert config.sp_seq_length is None and config.sp_seq_length_is_variable is True
    assert config.sp_attn_implementation is None
    with patch_environment(
        PARALLELISM_CONFIG_SP_SEQ_LENGTH_IS_VARIABLE="false",
        PARALLELISM_CONFIG_SP_SEQ_LENGTH="512",
        PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION="kernels-community/flash-attn2",
    ):
        config = DeepSpeedSequenceParallelConfig()
    assert (config.sp_seq_length, config.sp_seq_length_is_variable) == (512, False)
    assert config.sp_attn_implementation == "kernels-community/flash-attn2"
    with pytest.raises(ConfigurationError, match="sp_seq_length_is_variable=False needs sp_seq_length"):
        DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=False)
    with pytest.raises(
        ConfigurationError,
        match="sp_attn_implementation='eager': 'eager' and 'flex_attention' are not supported",
    ):
        DeepSpeedSequenceParallelConfig(sp_attn_implementation="eager")
