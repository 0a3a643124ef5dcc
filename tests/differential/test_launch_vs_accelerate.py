"""hasten launch and accelerate launch, given the same config file, hand the script environments from
which hasten's plugins and configs build the same objects (Accelerate writes every variable, hasten
those that were set; what is read back must agree)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from hasten.commands.cli import build_parser
from hasten.commands.launch import _check, _from_config
from hasten.parallelism_config import ParallelismConfig
from hasten.state import AcceleratorState
from hasten.utils.dataclasses.plugins.dynamo import TorchDynamoPlugin
from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin
from hasten.utils.environment import patch_environment
from hasten.utils.launch import prepare_multi_gpu_env
from tests.ranks import free_port

CONFIGS = {
    "fsdp2": {
        "distributed_type": "FSDP",
        "num_processes": 2,
        "use_cpu": True,
        "mixed_precision": "bf16",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "Block",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": False,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": True,
        },
        "parallelism_config": {"parallelism_config_dp_shard_size": 2, "parallelism_config_tp_size": 1},
    },
    "dynamo": {
        "distributed_type": "MULTI_CPU",
        "num_processes": 2,
        "use_cpu": True,
        "dynamo_config": {
            "dynamo_backend": "INDUCTOR",
            "dynamo_mode": "max-autotune",
            "dynamo_use_fullgraph": True,
        },
    },
}


def _ours(path: Path, port: int) -> dict[str, str]:
    args = build_parser().parse_args(
        ["launch", "--config_file", str(path), "--main_process_port", str(port), "x.py"]
    )
    _from_config(args)
    _check(args)
    return prepare_multi_gpu_env(args)


def _theirs(path: Path, port: int) -> dict[str, str]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env as accelerate_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "--main_process_port", str(port), "x.py"]
    )
    args, *_ = _validate_launch_command(args)
    return accelerate_env(args)


def _read(env: dict[str, str]) -> dict[str, Any]:
    launch = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_"))}
    read: dict[str, Any] = {}
    with patch_environment(**launch):
        AcceleratorState._reset_state(reset_partial_state=True)
        read["mixed_precision"] = AcceleratorState().mixed_precision
        AcceleratorState._reset_state(reset_partial_state=True)
        if launch.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            fsdp = FullyShardedDataParallelPlugin()
            read["fsdp"] = {
                name: str(getattr(fsdp, name))
                for name in (
                    "fsdp_version",
                    "reshard_after_forward",
                    "state_dict_type",
                    "cpu_offload",
                    "transformer_cls_names_to_wrap",
                    "cpu_ram_efficient_loading",
                    "activation_checkpointing",
                    "auto_wrap_policy",
                )
            }
        if launch.get("ACCELERATE_USE_PARALLELISM_CONFIG") == "true":
            read["parallelism"] = ParallelismConfig().to_json()
        if launch.get("ACCELERATE_DYNAMO_BACKEND", "NO") != "NO":
            read["dynamo"] = TorchDynamoPlugin().to_kwargs()
    return read


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_both_launchers_configure_the_same_objects(tmp_path: Path, name: str) -> None:
    pytest.importorskip("accelerate")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(CONFIGS[name]))
    port = free_port()
    with patch_environment(HF_HOME=str(tmp_path)):
        ours, theirs = _read(_ours(path, port)), _read(_theirs(path, port))
    if "dynamo" in theirs:
        # Accelerate writes ACCELERATE_DYNAMO_USE_DYNAMIC=False when the file does not say; hasten leaves
        # it unset, so torch.compile keeps its own default (dynamic=None: dynamic shapes when they vary).
        assert theirs["dynamo"].pop("dynamic") is False and "dynamic" not in ours["dynamo"]
    assert ours == theirs
    assert ours["mixed_precision"] == CONFIGS[name].get("mixed_precision", "no")
    assert os.environ.get("ACCELERATE_USE_FSDP") is None  # nothing leaked into this process
